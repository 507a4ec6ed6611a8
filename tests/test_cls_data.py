"""Classification datasets in their official formats, on fixture files the tests write."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mae_transfer.data.classification import (DatasetFormatError, build_dataset, classification_transform,
                                              read_inaturalist, read_split_list)


# ImageNet's channel statistics: reference.md's detection pixel mean and std (0-255 scale) divided by 255
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(path, value=128, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------ iNaturalist
def _inat(root, year=2018, split="train", categories=(7, 3, 12), drop=None, extra_annotation=None):
    """An official-format iNat file: sparse category ids, one annotation per image, images under train_valYYYY/."""
    images, annotations = [], []
    for i, cid in enumerate([12, 3, 7, 3]):
        file_name = f"train_val{year}/Animalia/{cid}/{i}.jpg"
        _image(root / file_name, value=40 * i)
        images.append({"id": 100 + i, "file_name": file_name, "width": 20, "height": 20, "license": 1})
        annotations.append({"id": i, "image_id": 100 + i, "category_id": cid})
    if extra_annotation is not None:
        annotations.append(extra_annotation)
    data = {"info": {"year": year}, "images": images, "annotations": annotations, "licenses": [],
            "categories": [{"id": c, "name": f"species {c}", "supercategory": "Animalia"} for c in categories]}
    if drop:
        (root / drop).unlink()
    path = root / f"{split}{year}.json"
    path.write_text(json.dumps(data))
    return path


def test_inaturalist_maps_sparse_category_ids_to_contiguous_labels(tmp_path):
    path = _inat(tmp_path)
    dataset = read_inaturalist(path, tmp_path)
    # sorted ids 3, 7, 12 -> labels 0, 1, 2; the class count is the file's number of categories
    assert dataset.classes == ["species 3", "species 7", "species 12"]
    assert dataset.labels == [2, 0, 1, 0]
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.files] == [
        "train_val2018/Animalia/12/0.jpg", "train_val2018/Animalia/3/1.jpg", "train_val2018/Animalia/7/2.jpg",
        "train_val2018/Animalia/3/3.jpg"]
    image, label, unreadable = dataset[2]
    assert (label, unreadable) == (1, 0) and image.size == (20, 20) and image.getpixel((0, 0)) == (80, 80, 80)

    via_name = build_dataset("inat2018", tmp_path, "train")
    assert via_name.labels == dataset.labels and len(via_name.classes) == 3


def test_an_unreadable_listed_image_is_skipped_naming_its_annotation_entry(tmp_path, caplog):
    path = _inat(tmp_path)
    (tmp_path / "train_val2018/Animalia/3/1.jpg").write_bytes(b"not a jpeg")
    dataset = read_inaturalist(path, tmp_path)
    with caplog.at_level("WARNING"):
        image, label, unreadable = dataset[1]
    assert (label, unreadable) == (1, 1) and image.getpixel((0, 0)) == (80, 80, 80)  # the next image, index 2
    assert f"{tmp_path / 'train_val2018/Animalia/3/1.jpg'} (listed at {path}: images[1] (id 101))" in caplog.text


def test_inaturalist_class_count_includes_categories_without_images(tmp_path):
    dataset = read_inaturalist(_inat(tmp_path, categories=(3, 7, 12, 40, 41)), tmp_path)
    assert len(dataset.classes) == 5 and dataset.labels == [2, 0, 1, 0]


def test_inaturalist_errors_name_the_file_and_entry(tmp_path):
    bad = _inat(tmp_path, extra_annotation={"id": 9, "image_id": 101, "category_id": 99})
    with pytest.raises(DatasetFormatError, match=r"train2018\.json: annotations\[4\]: category_id 99"):
        read_inaturalist(bad, tmp_path)
    bad = _inat(tmp_path, extra_annotation={"id": 9, "image_id": 101})
    with pytest.raises(DatasetFormatError, match=r"annotations\[4\]: expected an integer 'category_id'"):
        read_inaturalist(bad, tmp_path)
    missing = _inat(tmp_path, drop="train_val2018/Animalia/7/2.jpg")
    with pytest.raises(DatasetFormatError, match=r"train2018\.json: images\[2\] \(id 102\): image not found: .*2\.jpg"):
        read_inaturalist(missing, tmp_path)
    broken = tmp_path / "val2018.json"
    broken.write_text('{"images": [\n{"id": 1,,}]}')
    with pytest.raises(DatasetFormatError, match=r"val2018\.json:2: not valid JSON"):
        read_inaturalist(broken, tmp_path)
    broken.write_text('[{"id": 1}]')
    with pytest.raises(DatasetFormatError, match=r"val2018\.json: not an iNaturalist annotation file: the top level "
                                                 r"is a list"):
        read_inaturalist(broken, tmp_path)
    broken.write_text('{"images": [], "categories": []}')
    with pytest.raises(DatasetFormatError, match=r"no list 'annotations' \(top-level keys: images, categories\)"):
        read_inaturalist(broken, tmp_path)


# ---------------------------------------------------------------------------------------------------- Places
def test_places365_split_lists(tmp_path):
    lines = ["/a/airfield/00000001.jpg 0", "/a/airfield/00000002.jpg 0", "", "/z/zen_garden/00000001.jpg 364"]
    for line in lines:
        if line:
            _image(tmp_path / "data_256" / line.split()[0].lstrip("/"))
    (tmp_path / "places365_train_standard.txt").write_text("\n".join(lines) + "\n")
    _image(tmp_path / "val_256" / "Places365_val_00000001.jpg")
    (tmp_path / "places365_val.txt").write_text("Places365_val_00000001.jpg 165\n")

    train = build_dataset("places365", tmp_path, "train")
    assert train.labels == [0, 0, 364] and len(train.classes) == 365
    assert train.files[2] == tmp_path / "data_256/z/zen_garden/00000001.jpg"
    assert train.origins[2].endswith("places365_train_standard.txt:4")
    val = build_dataset("places365", tmp_path, "val")
    assert val.labels == [165] and val.files[0] == tmp_path / "val_256/Places365_val_00000001.jpg"
    _image(tmp_path / "val_large" / "Places365_val_00000001.jpg")  # both downloads: the 256 px one, as for train
    assert build_dataset("places365", tmp_path, "val").files[0] == tmp_path / "val_256/Places365_val_00000001.jpg"


def test_places205_official_layout(tmp_path):
    images = tmp_path / "data/vision/torralba/deeplearning/images256"
    _image(images / "a/abbey/gsun_0001.jpg")
    _image(images / "y/yard/gsun_0002.jpg")
    (tmp_path / "trainvalsplit_places205").mkdir()
    (tmp_path / "trainvalsplit_places205/val_places205.csv").write_text("a/abbey/gsun_0001.jpg 0\n"
                                                                       "y/yard/gsun_0002.jpg 204\n")
    val = build_dataset("places205", tmp_path, "val")
    assert val.labels == [0, 204] and len(val.classes) == 205


@pytest.mark.parametrize("line, message", [
    ("a/abbey/1.jpg", r"list\.txt:2: expected '<image path> <label>', got 'a/abbey/1\.jpg'"),
    ("a/abbey/1.jpg zero", r"list\.txt:2: label 'zero' is not an integer"),
    ("a/abbey/1.jpg 5", r"list\.txt:2: label 5 is outside \[0, 5\)"),
    ("a/abbey/missing.jpg 1", r"list\.txt:2: image not found: .*missing\.jpg"),
])
def test_split_list_errors_name_file_and_line(tmp_path, line, message):
    _image(tmp_path / "a/abbey/1.jpg")
    (tmp_path / "list.txt").write_text(f"a/abbey/1.jpg 1\n{line}\n")
    with pytest.raises(DatasetFormatError, match=message):
        read_split_list(tmp_path / "list.txt", tmp_path, num_classes=5)


# ------------------------------------------------------------------------------------------ folders, transforms
def test_image_folder_classes_and_errors(tmp_path):
    for split in ("train", "val"):
        for c in ("dog", "cat"):
            _image(tmp_path / split / c / "0.png")
    train = build_dataset("imagefolder", tmp_path, "train")
    assert train.classes == ["cat", "dog"] and sorted(train.labels) == [0, 1]
    _image(tmp_path / "flat" / "val" / "0.png")
    with pytest.raises(DatasetFormatError, match="outside class sub-folders"):
        build_dataset("imagefolder", tmp_path / "flat", "val")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        build_dataset("imagefolder", tmp_path / "nowhere", "train")


def test_eval_transform_is_the_references_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    for size, crop_pct in ((64, 224 / 256), (224, 224 / 256), (256, 1.0), (448, 1.0)):  # 224 / 256 up to 224
        reference = transforms.Compose([  # the MAE reference's build_transform(is_train=False)
            transforms.Resize(int(size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        torch.testing.assert_close(classification_transform(False, size)(image), reference(image))


def test_train_transforms_follow_the_protocol():
    # inside the wrapper that seeds `random` and NumPy per sample: the steps timm's create_transform built
    crop, flip, randaugment, to_tensor, normalize, erasing = classification_transform(
        True, 64, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25).transform.transforms
    # the reference keeps RandomResizedCrop's own defaults for classification (scale 0.08-1, ratio 3/4-4/3), bicubic
    assert (crop.size, crop.scale, crop.interpolation) == ((64, 64), (0.08, 1.0), InterpolationMode.BICUBIC)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    # rand-m9-mstd0.5-inc1: 2 ops per image at magnitude 9 (std 0.5), the variants that grow with the magnitude
    assert isinstance(randaugment, RandAugment) and randaugment.num_layers == 2
    assert {(op.magnitude, op.magnitude_std) for op in randaugment.ops} == {(9, 0.5)}
    names = {op.name for op in randaugment.ops}
    assert {"PosterizeIncreasing", "SolarizeIncreasing"} <= names and not names & {"Posterize", "Solarize"}
    assert isinstance(erasing, RandomErasing)
    assert (erasing.probability, erasing.mode, erasing.min_count, erasing.max_count) == (0.25, "pixel", 1, 1)
    *_, three = classification_transform(True, 64, re_prob=0.25, re_mode="rand", re_count=3).transform.transforms
    assert (three.mode, three.max_count) == ("rand", 3)  # --remode, --recount
    assert isinstance(normalize, transforms.Normalize)
    torch.testing.assert_close(torch.as_tensor(normalize.mean), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(torch.as_tensor(normalize.std), torch.tensor(IMAGENET_STD))

    # linear probing (main_linprobe.py): the same crop and flip, then only tensor and normalisation
    probe = classification_transform(True, 64).transform.transforms
    assert [type(step) for step in probe] == [type(crop), type(flip), type(to_tensor), type(normalize)]
    assert (probe[0].scale, probe[0].interpolation, probe[1].p) == ((0.08, 1.0), InterpolationMode.BICUBIC, 0.5)
    torch.testing.assert_close(torch.as_tensor(probe[3].mean), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(torch.as_tensor(probe[3].std), torch.tensor(IMAGENET_STD))


def _randaugment_ops(transform, name):
    steps = transform.transform.transforms
    return [op for step in steps for op in getattr(step, "ops", ()) if op.name == name]


def test_randaugment_posterize_at_the_top_magnitude_blacks_out_instead_of_crashing():
    transform = classification_transform(True, 32, auto_augment="rand-m9-mstd0.5-inc1")
    (op,) = _randaugment_ops(transform, "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # level 10 -> keep 4 - 4 = 0 bits
    out = op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))
    assert np.array(out).max() == 0
    op.magnitude = 5  # level 5 -> keep 2 bits: 200 = 0b11001000 -> 0b11000000
    assert np.array(op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)))).max() == 192


@pytest.mark.parametrize("policy", ["v0", "v0r", "original", "originalr", "3a", "rand-m9-mstd0.5-inc1",
                                    "rand-m0-n3", "augmix-m5-w4-d2"])
def test_every_timm_auto_augment_family_runs_under_this_pillow(policy):
    # v0's ('Posterize', 0.8, 2) keeps int(2 / 10 * 4) = 0 bits; rand-m0 asks Posterize for 0 bits on every draw
    transform = classification_transform(True, 16, auto_augment=policy)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    torch.manual_seed(0)
    for _ in range(200):
        assert transform(image).shape == (3, 16, 16)


def test_the_patched_posterize_keeps_what_pillow_keeps_and_blacks_out_at_zero_bits():
    (autoaugment,) = [step for step in classification_transform(True, 16, auto_augment="v0").transform.transforms
                      if isinstance(step, AutoAugment)]
    op = next(op for sub_policy in autoaugment.policy for op in sub_policy if op.name == "Posterize")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for bits in range(1, 9):
        np.testing.assert_array_equal(np.array(op.aug_fn(image, bits)), np.array(ImageOps.posterize(image, bits)))
    op.prob, op.magnitude = 1.0, 2  # level 2 -> keep int(2 / 10 * 4) = 0 bits: black, as Pillow before 13 gave
    assert np.array(op(image)).max() == 0


def test_augmentation_is_a_function_of_seed_epoch_and_index_only(tmp_path):
    import random
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(6):  # textured: each RandAugment op (numpy.random chooses them) changes such an image differently
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / f"{i}.png")
    transform = classification_transform(True, 32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    dataset = build_dataset("imagefolder", tmp_path, "train", transform, seed=7)
    dataset.set_epoch(3)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    first = [dataset[i].input for i in range(6)]
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # other global states: the same samples
    assert all(torch.equal(dataset[i].input, first[i]) for i in range(6))
    dataset.set_epoch(4)
    assert not torch.equal(dataset[1].input, first[1])
