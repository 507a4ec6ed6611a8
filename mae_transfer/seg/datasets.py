"""Any semantic-segmentation dataset in ADE20K's layout, checked before it can fail mid-training.

    DATA_ROOT/images/{training,validation}/NAME.jpg
    DATA_ROOT/annotations/{training,validation}/NAME.png    uint8 labels, 0 = unlabelled (ignored), 1..K = classes

mmseg's ADE20KDataset fixes the 150 ADE20K classes; this is mmseg's BaseSegDataset with that layout, the classes taken
from `metainfo=dict(classes=(...))`. It fails early and clearly where mmseg would fail deep inside a transform, or
not at all: an image without its annotation file (when the dataset is built) and a label map whose size differs from
its image as mmseg decodes it, turned by its EXIF orientation (when the sample is loaded).
"""
import os.path as osp
from typing import List, Tuple

from PIL import ExifTags, Image
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS

from ..data.images import missing_files

__all__ = ["ADE20KLayoutDataset"]

_TRANSPOSED = {5, 6, 7, 8}  # orientations that turn the image by 90 degrees


def _decoded_size(img: Image.Image) -> Tuple[int, int]:
    """(W, H) of an image as mmseg's LoadImageFromFile decodes it: OpenCV applies the EXIF orientation, while label
    maps are read as stored. Without this check a turned photo trains on misaligned labels."""
    w, h = img.size
    return (h, w) if img.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSED else (w, h)


@DATASETS.register_module()
class ADE20KLayoutDataset(BaseSegDataset):

    def __init__(self, img_suffix: str = ".jpg", seg_map_suffix: str = ".png", reduce_zero_label: bool = True,
                 **kwargs):
        if not (kwargs.get("metainfo") or {}).get("classes"):
            raise ValueError("ADE20KLayoutDataset needs the class names: metainfo=dict(classes=('name1', ...)), "
                             "class 1 of the label maps first")
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, reduce_zero_label=reduce_zero_label,
                         **kwargs)

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get("img_path", "")
        if not osp.isdir(img_dir):
            raise FileNotFoundError(f"image folder not found: {img_dir} (data_root {self.data_root!r})")
        data_list = super().load_data_list()
        if not data_list:
            raise FileNotFoundError(f"no '*{self.img_suffix}' images in {img_dir}")
        labelled = [d for d in data_list if "seg_map_path" in d]
        missing = [labelled[i]["img_path"] for i in missing_files([d["seg_map_path"] for d in labelled])]
        if missing:
            ann_dir = self.data_prefix.get("seg_map_path")
            raise FileNotFoundError(
                f"{len(missing)} of {len(data_list)} images have no annotation '<name>{self.seg_map_suffix}' in "
                f"{ann_dir}, e.g. " + ", ".join(osp.basename(p) for p in missing[:5]))
        return data_list

    def prepare_data(self, idx: int):
        info = self.get_data_info(idx)
        if "seg_map_path" in info:  # header reads only: cheap next to decoding the images
            with Image.open(info["img_path"]) as img, Image.open(info["seg_map_path"]) as seg:
                size = _decoded_size(img)
                if size != seg.size:
                    turned = " once turned by its EXIF orientation" if size != img.size else ""
                    raise ValueError(f"label map {info['seg_map_path']} is {seg.size[0]}x{seg.size[1]} (WxH) but its "
                                     f"image {info['img_path']} is {size[0]}x{size[1]}{turned}")
        return self.pipeline(info)
