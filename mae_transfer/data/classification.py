"""Classification datasets in their official on-disk formats.

    imagefolder   DATA/{train,val}/<class>/<image>              the MAE reference's layout (torchvision's ImageFolder)
    inat2017      DATA/{train,val}2017.json + images under DATA  iNaturalist JSON: images, annotations, categories
    inat2018      DATA/{train,val}2018.json + images under DATA  (file_name is relative to DATA, e.g. train_val2018/...)
    inat2019      DATA/{train,val}2019.json + images under DATA
    places205     DATA/trainvalsplit_places205/{train,val}_places205.csv     lines '<image path> <label>',
                  images under DATA/data/vision/torralba/deeplearning/images256
    places365     DATA/places365_train_standard.txt, DATA/places365_val.txt  lines '<image path> <label>',
                  images under DATA/data_256 (or data_large) and DATA/val_256 (or val_large)

iNaturalist category ids are sparse in general, so labels are their rank among the file's sorted category ids and
the class count is the file's number of categories. Every listed image is checked to exist when the dataset is
built (one directory listing per folder, not one stat per image), so a bad annotation stops a run before training
rather than hours into it; errors name the file and the line or entry.
"""
import json
import random
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment as auto_augment_ops

from .images import ImageFolderDataset, missing_files

__all__ = ["DATASETS", "DatasetFormatError", "ListedImages", "build_dataset", "classification_transform",
           "read_inaturalist", "read_split_list"]

PLACES_CLASSES = {"places205": 205, "places365": 365}


class DatasetFormatError(ValueError):
    """An annotation file that does not follow its dataset's official format, or lists images that do not exist."""


class ListedImages(ImageFolderDataset):
    """Images with integer labels listed in an annotation file, read like ImageFolderDataset reads a folder
    (per-sample seeded transforms; an unreadable file is reported and replaced by the next readable one).

    `origins[i]` says where sample i was listed (file and line or entry), for messages about it.
    """

    def __init__(self, root: Path, files: Sequence[Path], labels: Sequence[int], origins: Sequence[str],
                 classes: Sequence[str], transform: Optional[Callable] = None, seed: Optional[int] = None):
        super().__init__(root, transform, seed, listing=(files, labels, classes))
        self.origins = list(origins)

    def describe(self, index: int) -> str:
        return f"{self.files[index]} (listed at {self.origins[index]})"


def _check_images_exist(files: Sequence[Path], origins: Sequence[str], limit: int = 5) -> None:
    missing = missing_files(files)
    if missing:
        shown = "\n  ".join(f"{origins[i]}: image not found: {files[i]}" for i in missing[:limit])
        more = f"\n  ... and {len(missing) - limit} more" if len(missing) > limit else ""
        raise DatasetFormatError(f"{len(missing)} listed image(s) do not exist:\n  {shown}{more}")


def read_inaturalist(json_path, image_root, transform: Optional[Callable] = None,
                     seed: Optional[int] = None) -> ListedImages:
    """An iNaturalist 2017/2018/2019 split from its official JSON (COCO-like: images, annotations, categories).

    Each image has exactly one annotation; samples follow the file's image order.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"iNaturalist annotation file not found: {json_path}")
    try:
        data = json.loads(json_path.read_bytes())  # bytes: JSON's own encoding detection, not the locale's
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_path}: not an iNaturalist annotation file: the top level is a "
                                 f"{type(data).__name__}, not an object with images, annotations and categories")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetFormatError(f"{json_path}: not an iNaturalist annotation file: no list {missing[0]!r} "
                                 f"(top-level keys: {', '.join(data)})")

    def field(section: str, i: int, entry, key: str, kind):
        if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
            what = {int: "an integer", str: "a string"}[kind]
            raise DatasetFormatError(f"{json_path}: {section}[{i}]: expected {what} {key!r}, got {entry!r}")
        return entry[key]

    category_ids = sorted({field("categories", i, c, "id", int) for i, c in enumerate(data["categories"])})
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    annotation_of: Dict[int, Tuple[int, int]] = {}  # image id -> (annotation index, category id)
    for i, ann in enumerate(data["annotations"]):
        image_id, category_id = field("annotations", i, ann, "image_id", int), field("annotations", i, ann,
                                                                                    "category_id", int)
        if category_id not in label_of:
            raise DatasetFormatError(f"{json_path}: annotations[{i}]: category_id {category_id} is not among the "
                                     f"file's {len(category_ids)} categories")
        if image_id in annotation_of:
            raise DatasetFormatError(f"{json_path}: annotations[{i}]: image {image_id} already has a label "
                                     f"(annotations[{annotation_of[image_id][0]}]); expected one per image")
        annotation_of[image_id] = (i, category_id)
    files, labels, origins = [], [], []
    for i, image in enumerate(data["images"]):
        image_id, file_name = field("images", i, image, "id", int), field("images", i, image, "file_name", str)
        if image_id not in annotation_of:
            raise DatasetFormatError(f"{json_path}: images[{i}] (id {image_id}, {file_name}) has no annotation")
        files.append(image_root / file_name)
        labels.append(label_of[annotation_of.pop(image_id)[1]])
        origins.append(f"{json_path}: images[{i}] (id {image_id})")
    if annotation_of:
        i, _ = min(annotation_of.values())
        raise DatasetFormatError(f"{json_path}: annotations[{i}]: image_id {data['annotations'][i]['image_id']} "
                                 "is not in 'images'")
    _check_images_exist(files, origins)
    return ListedImages(image_root, files, labels, origins, [names[c] for c in category_ids], transform, seed)


def read_split_list(list_path, image_root, num_classes: int, transform: Optional[Callable] = None,
                    seed: Optional[int] = None) -> ListedImages:
    """A Places205 / Places365 split list: one '<image path> <label>' line per image, labels in [0, num_classes).

    Paths are relative to `image_root` (a leading '/', as in places365_train_standard.txt, is ignored).
    """
    list_path, image_root = Path(list_path), Path(image_root)
    if not list_path.is_file():
        raise FileNotFoundError(f"split list not found: {list_path}")
    files, labels, origins = [], [], []
    with open(list_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            where = f"{list_path}:{number}"
            if len(parts) != 2:
                raise DatasetFormatError(f"{where}: expected '<image path> <label>', got {line.rstrip()!r}")
            path, label = parts
            try:
                label = int(label)
            except ValueError:
                raise DatasetFormatError(f"{where}: label {label!r} is not an integer") from None
            if not 0 <= label < num_classes:
                raise DatasetFormatError(f"{where}: label {label} is outside [0, {num_classes})")
            files.append(image_root / path.lstrip("/"))
            labels.append(label)
            origins.append(where)
    if not files:
        raise DatasetFormatError(f"{list_path}: lists no images")
    _check_images_exist(files, origins)
    return ListedImages(image_root, files, labels, origins, [str(c) for c in range(num_classes)], transform, seed)


def _first_existing(root: Path, *candidates: str) -> Path:
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"image folder not found: expected {' or '.join(str(root / c) for c in candidates)}")


def _image_folder(root: Path, split: str, transform, seed) -> ImageFolderDataset:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (expected {root}/{{train,val}}/<class>/<image>)")
    dataset = ImageFolderDataset(folder, transform, seed)
    if not dataset.classes:
        raise DatasetFormatError(f"{folder} has images outside class sub-folders; classification needs "
                                 f"{folder}/<class>/<image>")
    return dataset


def _inaturalist(year: int):
    def build(root: Path, split: str, transform, seed) -> ListedImages:
        return read_inaturalist(root / f"{split}{year}.json", root, transform, seed)
    return build


def _places205(root: Path, split: str, transform, seed) -> ListedImages:
    return read_split_list(root / "trainvalsplit_places205" / f"{split}_places205.csv",
                           root / "data/vision/torralba/deeplearning/images256", PLACES_CLASSES["places205"],
                           transform, seed)


def _places365(root: Path, split: str, transform, seed) -> ListedImages:
    list_file, folders = {"train": ("places365_train_standard.txt", ("data_256", "data_large")),
                          "val": ("places365_val.txt", ("val_256", "val_large"))}[split]
    return read_split_list(root / list_file, _first_existing(root, *folders), PLACES_CLASSES["places365"],
                           transform, seed)


# name -> (data root, 'train' | 'val', transform, seed) -> dataset of Samples with a `classes` list
DATASETS: Dict[str, Callable[[Path, str, Optional[Callable], Optional[int]], ImageFolderDataset]] = {
    "imagefolder": _image_folder,
    "inat2017": _inaturalist(2017),
    "inat2018": _inaturalist(2018),
    "inat2019": _inaturalist(2019),
    "places205": _places205,
    "places365": _places365,
}


def build_dataset(name: str, data_path, split: str, transform: Optional[Callable] = None,
                  seed: Optional[int] = None) -> ImageFolderDataset:
    """The `split` ('train' or 'val') of dataset `name` under `data_path`; `len(dataset.classes)` classes.

    With a `seed`, each sample's random augmentation depends only on (seed, epoch, index): see ImageFolderDataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return DATASETS[name](Path(data_path), split, transform, seed)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize for every auto-augment level: keeping 0 bits gives a black image, as it did before
    Pillow 13, whose ImageOps.posterize rejects 0. 'rand-m9-mstd0.5-inc1' asks for 0 bits whenever its sampled
    magnitude reaches the upper bound 10 (2.3% of the draws), and AutoAugment 'v0' in its ('Posterize', 0.8, 2)
    sub-policy, either of which would crash a run within its first epoch."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment_ops.posterize(img, bits_to_keep)


class _SeededFromTorch:
    """Runs a transform with Python's and NumPy's global generators seeded from torch's generator.

    timm's RandAugment and random erasing draw from `random` and `numpy.random`; ImageFolderDataset seeds only
    torch per sample, so this carries its per-sample seed to them: an augmented sample is then the same with any
    number of loader workers and after a resume. The global generators are restored afterwards.
    """

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def classification_transform(is_train: bool, input_size: int, *, auto_augment: Optional[str] = None,
                             color_jitter: Optional[float] = None, re_prob: float = 0.0, re_mode: str = "pixel",
                             re_count: int = 1) -> Callable:
    """The MAE reference's classification transforms, built by timm's create_transform.

    Training: RandomResizedCrop (bicubic) + flip, then RandAugment / colour jitter and random erasing if asked (the
    fine-tuning recipe asks for 'rand-m9-mstd0.5-inc1' and 0.25; linear probing for neither). Evaluation: resize the
    short side to input_size / 0.875 (bicubic) and centre-crop input_size; above 224 px no margin (crop ratio 1).
    """
    if not is_train:
        return create_transform(input_size, is_training=False, interpolation="bicubic",
                                crop_pct=224 / 256 if input_size <= 224 else 1.0,
                                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    transform = create_transform(input_size, is_training=True, color_jitter=color_jitter, auto_augment=auto_augment,
                                 interpolation="bicubic", re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    for step in transform.transforms:
        if isinstance(step, auto_augment_ops.AutoAugment):  # v0, original, 3a, ...: a list of sub-policies
            ops = [op for sub_policy in step.policy for op in sub_policy]
        else:  # RandAugment and AugMix: one list
            ops = getattr(step, "ops", ())
        for op in ops:
            if op.aug_fn is auto_augment_ops.posterize:
                op.aug_fn = _posterize
    return _SeededFromTorch(transform)
