"""COCO-format instance datasets given by paths, so a config trains on any such dataset without code:

    dataloader.train.dataset.json_file=/data/mine/annotations/train.json
    dataloader.train.dataset.image_root=/data/mine/train
    dataloader.test.dataset.json_file=...  dataloader.test.dataset.image_root=...  model.roi_heads.num_classes=K

`coco_instances` registers the files with detectron2's register_coco_instances under a name (which COCOEvaluator
and the metadata catalog use) and returns detectron2's dataset dicts, failing early and clearly on a missing file.
"""
import logging
import os
from typing import List

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

from ..data.images import missing_files

__all__ = ["check_num_classes", "coco_instances", "register_coco"]

logger = logging.getLogger(__name__)


def register_coco(name: str, json_file: str, image_root: str) -> None:
    """Register (or re-point) `name` to a COCO-format annotation file and image folder."""
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset {name!r}: annotation file not found: {json_file} "
                                f"(set it with dataloader.{{train,test}}.dataset.json_file=...)")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset {name!r}: image folder not found: {image_root} "
                                f"(set it with dataloader.{{train,test}}.dataset.image_root=...)")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        # A name given new paths (e.g. detectron2's built-in coco_2017_train pointed at another copy): re-register.
        logger.info(f"dataset {name!r} now reads {json_file} and {image_root}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, image_root)


def coco_instances(name: str, json_file: str, image_root: str, filter_empty: bool = True) -> List[dict]:
    """detectron2 dataset dicts of a COCO-format instance dataset, registered under `name`.

    filter_empty drops images without annotations (detectron2's default for training; keep them for evaluation).
    Every image the annotations reference must exist under image_root.
    """
    register_coco(name, json_file, image_root)
    dicts = get_detection_dataset_dicts(name, filter_empty=filter_empty)
    missing = [dicts[i]["file_name"] for i in missing_files([d["file_name"] for d in dicts])]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"dataset {name!r}: {len(missing)} of the {len(dicts)} images that {json_file} "
                                f"references are missing under {image_root}: {shown}")
    return dicts


def check_num_classes(name: str, num_classes: int, split: str = "train") -> None:
    """A detector's class count must match the dataset's categories (checked after the dataset was loaded): those
    of the training set, which the model is built for, and those of the test set it is evaluated on."""
    classes = MetadataCatalog.get(name).get("thing_classes")
    if classes is None or len(classes) == num_classes:
        return
    fix = (f"add model.roi_heads.num_classes={len(classes)}" if split == "train" else
           f"evaluate on a dataset of the model's {num_classes} categories (dataloader.test.dataset.json_file=...)")
    raise ValueError(f"{split} dataset {name!r} has {len(classes)} categories but model.roi_heads.num_classes is "
                     f"{num_classes}: {fix}")
