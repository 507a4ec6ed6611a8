"""The built-in synthetic world: determinism, and each dataset's format checked by its own reader."""

import colorsys
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mae_transfer.data import synthetic
from mae_transfer.data.synthetic import CATEGORIES, PRESETS, dominant_scene, generate_world, render_scene

TINY = PRESETS["tiny"]
K = len(CATEGORIES)


def _file_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "world"
    generate_world(root, seed=0, size="tiny")
    return root


def test_same_seed_same_bytes_other_seed_other_images(world, tmp_path):
    generate_world(tmp_path / "again", seed=0, size="tiny")
    generate_world(tmp_path / "other", seed=1, size="tiny")
    hashes, again, other = (_file_hashes(p) for p in (world, tmp_path / "again", tmp_path / "other"))
    assert hashes == again
    assert hashes.keys() == other.keys()
    images = [name for name in hashes if name.endswith((".png", ".jpg")) and "annotations" not in name]
    assert len(images) == (TINY.pretrain + TINY.det_train + TINY.det_val + TINY.seg_train + TINY.seg_val
                           + K * (TINY.cls_train_per_class + TINY.cls_val_per_class))
    assert all(hashes[name] != other[name] for name in images)
    assert not list(tmp_path.glob("*.partial"))


def test_rerun_is_a_no_op_and_a_different_world_is_refused(world):
    before = _file_hashes(world)
    assert generate_world(world, seed=0, size="tiny")["categories"] == list(CATEGORIES)
    assert _file_hashes(world) == before
    with pytest.raises(FileExistsError, match="seed 1"):
        generate_world(world, seed=1, size="tiny")
    with pytest.raises(ValueError, match="'huge'"):
        generate_world(world.parent / "unused", size="huge")


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_match_boxes_and_areas(world, split):
    coco = COCO(str(world / "coco" / "annotations" / f"instances_{split}.json"))
    assert len(coco.getImgIds()) == getattr(TINY, f"det_{split}")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert coco.getCatIds() == list(range(1, K + 1))
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        with Image.open(world / "coco" / split / info["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert anns, f"image {image_id} has no objects"
        covered = np.zeros((info["height"], info["width"]), int)
        for ann in anns:
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum() > 0
            assert ann["iscrowd"] == 0
            covered += mask
        assert covered.max() == 1, "visible masks of one image must not overlap"


def test_coco_loads_in_detectron2(world):
    # RLE masks need detectron2's "bitmask" instance mask format (its default "polygon" rejects them).
    pytest.importorskip("detectron2")
    from detectron2.data.datasets import load_coco_json
    from detectron2.data.detection_utils import annotations_to_instances

    json_file = world / "coco/annotations/instances_val.json"
    dicts = load_coco_json(str(json_file), str(world / "coco/val"), "synthetic_val")
    assert len(dicts) == TINY.det_val
    assert sum(len(d["annotations"]) for d in dicts) == len(json.loads(json_file.read_text())["annotations"])
    for d in dicts:
        instances = annotations_to_instances(d["annotations"], (d["height"], d["width"]), mask_format="bitmask")
        assert instances.gt_classes.tolist() == [a["category_id"] for a in d["annotations"]]
        assert set(instances.gt_classes.tolist()) <= set(range(K))  # contiguous ids
        assert instances.gt_boxes.tensor.equal(instances.gt_masks.get_bounding_boxes().tensor)


@pytest.mark.parametrize("split", ["training", "validation"])
def test_ade_labels_in_range_and_paired_with_images(world, split):
    images = sorted((world / "ade" / "images" / split).glob("*.jpg"))
    labels = sorted((world / "ade" / "annotations" / split).glob("*.png"))
    assert len(images) == getattr(TINY, "seg_train" if split == "training" else "seg_val")
    assert [p.stem for p in images] == [p.stem for p in labels]
    for image_path, label_path in zip(images, labels):
        with Image.open(image_path) as image, Image.open(label_path) as label:
            assert image.mode == "RGB" and label.mode == "L" and image.size == label.size
            values = np.unique(np.asarray(label))
        assert values[0] == 0 and 1 <= values[-1] <= K, f"{label_path}: labels {values}"


def test_ade_layout_loads_in_mmseg(world):
    # mmseg's ADE20KDataset accepts only ADE's own 150 class names; the same layout and label convention
    # (.jpg/.png, reduce_zero_label) with our classes is its base class configured as ADE20KDataset does.
    pytest.importorskip("mmseg")
    from mmseg.datasets import BaseSegDataset
    from mmseg.utils import register_all_modules

    register_all_modules()
    dataset = BaseSegDataset(data_root=str(world / "ade"), metainfo=dict(classes=CATEGORIES),
                             data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
                             img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True,
                             pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")])
    assert len(dataset) == TINY.seg_val
    sample = dataset[0]
    raw = np.asarray(Image.open(sample["seg_map_path"])).astype(int)
    assert sample["img"].shape == (TINY.image_size, TINY.image_size, 3)
    np.testing.assert_array_equal(sample["gt_seg_map"], np.where(raw == 0, 255, raw - 1))


def test_classification_folders(world):
    for split, per_class in (("train", TINY.cls_train_per_class), ("val", TINY.cls_val_per_class)):
        folders = sorted(p.name for p in (world / "cls" / split).iterdir())
        assert folders == sorted(CATEGORIES)
        for name in folders:
            files = sorted((world / "cls" / split / name).glob("*.png"))
            assert len(files) == per_class
            with Image.open(files[0]) as image:
                assert image.mode == "RGB" and image.size == (TINY.image_size, TINY.image_size)
    assert len(list((world / "pretrain" / "train").glob("*.png"))) == TINY.pretrain


# Areas of the shapes of circumradius r, worked out by hand from their definitions in synthetic.py.
_AREA_OVER_R2 = {
    "disc": np.pi,
    "ring": np.pi * (1 - 0.55**2),
    "square": 2.0,                          # side r * sqrt(2)
    "triangle": 3 * np.sqrt(3) / 4,
    "star": np.pi * (0.45**2 + 0.45 * 0.55 + 0.55**2 / 3),  # radius linear in angle from 0.45 r to r, 10 sectors
    "cross": 2 * (2 * 0.6) - 0.6**2,        # two 2r x 0.6r bars minus their overlap
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_rendered_shape_has_its_area(category):
    radius, size = 20.0, 100
    for seed in range(10):  # the first scene whose object the border does not cut
        scene = render_scene(np.random.default_rng(seed), size, [(CATEGORIES.index(category), radius)])
        (mask,) = scene.masks
        if not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()):
            break
    assert scene.categories == [CATEGORIES.index(category)]
    assert mask.sum() == pytest.approx(_AREA_OVER_R2[category] * radius**2, rel=0.02)


def test_classification_object_dominates():
    for seed in range(20):
        label = seed % K
        scene = dominant_scene(np.random.default_rng(seed), TINY.image_size, label)
        areas = [mask.sum() for mask in scene.masks]
        assert scene.categories[0] == label and areas[0] == max(areas)


@pytest.mark.parametrize("category", range(K))
def test_object_hue_is_its_category_s_as_often_as_documented(category):
    """An object's hue lies in its category's band with probability p + (1 - p) * band (a random hue can land there
    too); textures only darken, so every pixel of an object has its hue."""
    rng, draws = np.random.default_rng(category), 3000
    x = y = np.arange(4.0)
    in_band = 0
    for _ in range(draws):
        hues = {round(colorsys.rgb_to_hsv(*(c / 255))[0], 6) for c in synthetic._object_colours(rng, category, x, y)}
        assert len(hues) == 1
        distance = abs((hues.pop() - category / K + 0.5) % 1.0 - 0.5)  # around the colour wheel
        in_band += distance <= synthetic._HUE_BAND / 2
    p = synthetic._CATEGORY_HUE_PROB
    assert in_band / draws == pytest.approx(p + (1 - p) * synthetic._HUE_BAND, abs=0.03)


def test_no_image_appears_twice_across_splits_and_datasets(world):
    """Every split has its own random stream: a validation image that repeated a training one would measure
    memorisation, not transfer."""
    pixels = {}
    for path in sorted(world.rglob("*")):
        if path.suffix in (".png", ".jpg") and "annotations" not in path.parts:
            with Image.open(path) as image:
                pixels.setdefault(hashlib.sha256(np.asarray(image).tobytes()).hexdigest(), []).append(path)
    assert [paths for paths in pixels.values() if len(paths) > 1] == []


def test_ade_label_of_an_object_is_its_category_index_plus_one(tmp_path, monkeypatch):
    # A hand-made scene (rectangles standing for a disc, category 0, and a cross, category 5) on background.
    masks = [np.zeros((32, 32), bool) for _ in range(2)]
    masks[0][2:6, 2:6], masks[1][20:30, 10:12] = True, True
    scene = synthetic.Scene(np.full((32, 32, 3), 128, np.uint8), [0, 5], masks)
    monkeypatch.setattr(synthetic, "clutter_scene", lambda rng, size: scene)
    synthetic._write_ade(tmp_path, "val", 1, 0, 32)
    expected = np.zeros((32, 32), np.uint8)
    expected[masks[0]], expected[masks[1]] = CATEGORIES.index("disc") + 1, CATEGORIES.index("cross") + 1
    with Image.open(tmp_path / "annotations" / "validation" / "000000.png") as label:
        np.testing.assert_array_equal(np.asarray(label), expected)


def test_each_class_folder_holds_its_own_category(tmp_path, monkeypatch):
    # Each image filled with the grey level of the label it was drawn for, so the file says which label that was.
    def drawn_for(rng, size, label):
        return synthetic.Scene(np.full((size, size, 3), label, np.uint8), [label], [np.ones((size, size), bool)])

    monkeypatch.setattr(synthetic, "dominant_scene", drawn_for)
    synthetic._write_cls(tmp_path, "train", 2, 0, 32)
    for name in CATEGORIES:
        for path in sorted((tmp_path / "train" / name).glob("*.png")):
            with Image.open(path) as image:
                assert np.unique(np.asarray(image)).tolist() == [CATEGORIES.index(name)], path


def test_a_leftover_of_an_interrupted_run_is_replaced(world, tmp_path):
    out = tmp_path / "world"
    (tmp_path / "world.partial" / "pretrain" / "train").mkdir(parents=True)  # as a run killed while writing
    (tmp_path / "world.partial" / "pretrain" / "train" / "000000.png").write_bytes(b"half a png")
    generate_world(out, seed=0, size="tiny")
    assert _file_hashes(out) == _file_hashes(world)
    assert not (tmp_path / "world.partial").exists()
