"""A built-in synthetic image world, written in the real dataset formats.

No dataset can be downloaded on every machine, yet a user should be able to watch pretraining and all three
transfers work end to end. This module draws RGB scenes of a few shape categories (varied colours, textures,
sizes, rotations, occlusion, textured gradient backgrounds) and writes them as:

    DIR/world.json                          seed, sizes, category names, what lives where
    DIR/pretrain/train/*.png                unlabeled images for MAE pretraining
    DIR/coco/{train,val}/*.png              COCO instances (Mask R-CNN), masks as compressed RLE of the
    DIR/coco/annotations/instances_{train,val}.json     visible part of each object after occlusion
    DIR/ade/images/{training,validation}/*.jpg          ADE20K layout (UperNet): label 0 = background
    DIR/ade/annotations/{training,validation}/*.png     (ignored by reduce_zero_label), objects 1..K
    DIR/cls/{train,val}/<category>/*.png    image folders for classification, one dominant object per image

Shape always identifies a category; colour does only in part, as for real objects: an object's hue falls in its
category's band with probability _CATEGORY_HUE_PROB and is random otherwise. That partial cue is what lets the tiny
models of the CPU demo learn at all (measured: with colour independent of category, a ViT-Tiny/16 at
64 px stays at chance for 30 epochs, from MAE and from scratch), while shape leaves room above what colour alone
gives (a classifier of colour alone is right at most 0.6 + 0.4 / 6 = 67% of the time).

Each image comes from its own generator seeded by (seed, dataset split, index), so the world is a pure function
of its arguments: on the same software stack (numpy, Pillow) the same seed gives the same files, byte for byte.

    python -m mae_transfer.data.synthetic --out data/world --seed 0 --size small
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

__all__ = ["CATEGORIES", "PRESETS", "Scene", "WorldSize", "clutter_scene", "dominant_scene", "generate_world",
           "render_scene"]


@dataclasses.dataclass(frozen=True)
class WorldSize:
    """Image side in pixels and image counts of each dataset split."""

    image_size: int
    pretrain: int
    det_train: int
    det_val: int
    seg_train: int
    seg_val: int
    cls_train_per_class: int
    cls_val_per_class: int


PRESETS = {
    # Sized for the demo's 8-14 minutes on 2 CPU cores (tools/demo.py).
    "small": WorldSize(96, pretrain=2000, det_train=320, det_val=80, seg_train=320, seg_val=80,
                       cls_train_per_class=60, cls_val_per_class=15),
    # For tests: every format present, generated in well under a second.
    "tiny": WorldSize(64, pretrain=16, det_train=8, det_val=4, seg_train=8, seg_val=4,
                      cls_train_per_class=3, cls_val_per_class=2),
}

# Independent random streams, one per dataset split; changing a count never changes another split's images.
_STREAMS = {"pretrain": 0, "det_train": 1, "det_val": 2, "seg_train": 3, "seg_val": 4, "cls_train": 5, "cls_val": 6}

_MAX_OBJECTS = 4                 # objects per detection / segmentation / pretraining scene: 1..4
_OBJECT_RADIUS = (0.08, 0.2)     # circumradius as a fraction of the image side
_DOMINANT_RADIUS = (0.25, 0.38)  # the labelled object of a classification image
_DISTRACTOR_RADIUS = (0.07, 0.12)
_MIN_VISIBLE = 0.5               # an object may lose at most half its pixels to later (occluding) objects
_MIN_PIXELS = 12                 # nothing smaller is drawn, so nothing unannotated hides in an image
_PLACEMENT_TRIES = 20
_NOISE_STD = 3.0                 # sensor-like noise, in grey levels
_CATEGORY_HUE_PROB = 0.6         # how often an object's hue is its category's (module docstring)
_HUE_BAND = 1 / 12               # width of a category's hue band, as a fraction of the colour wheel
_BACKGROUND_CONTRAST = 15.0      # at most, in grey levels: faint enough that objects stand out
_SAVE_OPTIONS = {".png": {}, ".jpg": {"quality": 95}}  # fixed encoder settings: reproducible bytes


# --------------------------------------------------------------------------------------------------- shapes
# Each shape maps coordinates (u, v) in the object's rotated frame, centred on it, and its circumradius r to a
# boolean mask. Masks are evaluated at pixel centres with no anti-aliasing, so a mask is exactly the set of
# pixels painted with the object's colours.

def _regular_polygon(u: np.ndarray, v: np.ndarray, r: float, sides: int) -> np.ndarray:
    normals = 2 * np.pi * np.arange(sides) / sides
    inradius = r * np.cos(np.pi / sides)
    return np.all(u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals) <= inradius, axis=-1)


def _disc(u, v, r):
    return u**2 + v**2 <= r**2


def _ring(u, v, r):
    return ((0.55 * r) ** 2 <= u**2 + v**2) & (u**2 + v**2 <= r**2)


def _square(u, v, r):
    return _regular_polygon(u, v, r, 4)


def _triangle(u, v, r):
    return _regular_polygon(u, v, r, 3)


def _star(u, v, r, points=5, inner=0.45):
    # The boundary radius goes linearly from the tip (r) to the notch (inner * r) within each of 2 * points sectors.
    sector = 2 * np.pi / points
    offset = np.abs(np.mod(np.arctan2(v, u), sector) - sector / 2) / (sector / 2)  # 1 at a tip, 0 at a notch
    return np.hypot(u, v) <= r * (inner + (1 - inner) * offset)


def _cross(u, v, r, half_width=0.3):
    return ((np.abs(u) <= half_width * r) & (np.abs(v) <= r)) | ((np.abs(v) <= half_width * r) & (np.abs(u) <= r))


_SHAPES: dict[str, Callable[..., np.ndarray]] = {
    "disc": _disc, "ring": _ring, "square": _square, "triangle": _triangle, "star": _star, "cross": _cross,
}
CATEGORIES = tuple(_SHAPES)  # category index k is COCO category_id k + 1 and ADE label k + 1


# ------------------------------------------------------------------------------------------------- textures
# A texture maps pixel coordinates to a blend weight t in [0, 1] between two colours.

def _rotated(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, np.pi)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _solid(rng, x, y):
    return np.zeros_like(x)


def _stripes(rng, x, y):
    along, _ = _rotated(rng, x, y)
    period = rng.uniform(3, 9)
    return (np.mod(along, period) < period / 2).astype(float)


def _checks(rng, x, y):
    along, across = _rotated(rng, x, y)
    cell = rng.uniform(2, 7)
    return np.mod(np.floor(along / cell) + np.floor(across / cell), 2)


def _waves(rng, x, y):
    along, across = _rotated(rng, x, y)
    p, q = rng.uniform(6, 20, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    return (1 + np.sin(2 * np.pi * along / p + phase[0]) * np.sin(2 * np.pi * across / q + phase[1])) / 2


def _speckle(rng, x, y):
    return rng.random(x.shape)


_TEXTURES = (_solid, _stripes, _checks, _waves, _speckle)


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float],
            hue: float | None = None) -> np.ndarray:
    """An RGB colour in [0, 255] of the given hue (random if None) and random saturation and value in ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random() if hue is None else hue, rng.uniform(*saturation), rng.uniform(*value))
    return 255.0 * np.array(rgb)


def _object_colours(rng: np.random.Generator, category: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Colours (..., 3) of a saturated object at pixel coordinates (x, y): a random texture between a colour whose
    hue is often its category's (module docstring) and a darker shade of it."""
    hue = None  # random
    if rng.random() < _CATEGORY_HUE_PROB:
        hue = (category / len(CATEGORIES) + rng.uniform(-_HUE_BAND / 2, _HUE_BAND / 2)) % 1.0
    colour = _colour(rng, (0.55, 1.0), (0.5, 1.0), hue)
    t = _TEXTURES[rng.integers(len(_TEXTURES))](rng, x, y)
    return colour * (1 - t[..., None] * rng.uniform(0.0, 0.4))


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A muted two-colour gradient in a random direction under a faint random texture."""
    along, _ = _rotated(rng, x, y)
    ramp = (along - along.min()) / np.ptp(along)
    start, end = _colour(rng, (0.0, 0.35), (0.25, 0.9)), _colour(rng, (0.0, 0.35), (0.25, 0.9))
    texture = _TEXTURES[rng.integers(len(_TEXTURES))](rng, x, y)
    contrast = rng.uniform(0, _BACKGROUND_CONTRAST)
    return start + ramp[..., None] * (end - start) + contrast * (texture[..., None] - 0.5)


# ---------------------------------------------------------------------------------------------------- scenes
class Scene(NamedTuple):
    image: np.ndarray           # (H, W, 3) uint8 RGB
    categories: list[int]       # category index into CATEGORIES, one per object, in drawing order
    masks: list[np.ndarray]     # (H, W) bool: the VISIBLE pixels of each object, pairwise disjoint


def render_scene(rng: np.random.Generator, size: int, objects: Sequence[tuple[int, float]]) -> Scene:
    """Draw objects, given as (category index, circumradius in pixels), back to front on a background.

    Each object is placed at a random position and rotation such that it keeps at least _MIN_PIXELS pixels and
    every earlier object keeps at least _MIN_VISIBLE of its pixels; an object that finds no such place within
    _PLACEMENT_TRIES is left out, so the returned scene may hold fewer objects than asked for.
    """
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    image = _background(rng, x, y)
    categories, masks, areas = [], [], []
    for category, radius in objects:
        for _ in range(_PLACEMENT_TRIES):
            # Centres keep 60% of the radius inside the image: objects may be cut by the border, but not mostly.
            cx, cy = rng.uniform(0.6 * radius, size - 0.6 * radius, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            mask = _SHAPES[CATEGORIES[category]](u, v, radius)
            if mask.sum() < _MIN_PIXELS:
                continue
            occluded = [visible & ~mask for visible in masks]
            if all(o.sum() >= max(_MIN_VISIBLE * a, _MIN_PIXELS) for o, a in zip(occluded, areas)):
                image[mask] = _object_colours(rng, int(category), x[mask], y[mask])
                categories.append(int(category))
                masks = occluded + [mask]
                areas.append(mask.sum())
                break
    image += rng.normal(0, _NOISE_STD, image.shape)
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), categories, masks)


def clutter_scene(rng: np.random.Generator, size: int) -> Scene:
    """A scene of 1.._MAX_OBJECTS objects of random categories and sizes: pretraining, detection, segmentation."""
    count = rng.integers(1, _MAX_OBJECTS + 1)
    objects = [(rng.integers(len(CATEGORIES)), rng.uniform(*_OBJECT_RADIUS) * size) for _ in range(count)]
    return render_scene(rng, size, objects)


def dominant_scene(rng: np.random.Generator, size: int, label: int) -> Scene:
    """A large object of category `label` with up to two small distractors of any category: classification."""
    objects = [(label, rng.uniform(*_DOMINANT_RADIUS) * size)]
    objects += [(rng.integers(len(CATEGORIES)), rng.uniform(*_DISTRACTOR_RADIUS) * size)
                for _ in range(rng.integers(0, 3))]
    return render_scene(rng, size, objects)


def _rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], *index])


# --------------------------------------------------------------------------------------------------- writers
_LAYOUT = {  # relative to the world's folder
    "pretrain": "pretrain/train",
    "coco": "coco/{train,val} + coco/annotations/instances_{train,val}.json",
    "ade": "ade/{images,annotations}/{training,validation}",
    "cls": "cls/{train,val}/<category>",
}


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, **_SAVE_OPTIONS[path.suffix])


def _write_pretrain(root: Path, count: int, seed: int, size: int) -> None:
    root.mkdir(parents=True)
    for i in range(count):
        _save(clutter_scene(_rng(seed, "pretrain", i), size).image, root / f"{i:06d}.png")


def _write_coco(root: Path, split: str, count: int, seed: int, size: int) -> None:
    """COCO instances: one RLE per visible object mask; bbox and area are those of that mask."""
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        scene = clutter_scene(_rng(seed, f"det_{split}", i), size)
        file_name = f"{i:06d}.png"
        _save(scene.image, root / split / file_name)
        images.append({"id": i + 1, "file_name": file_name, "height": size, "width": size})
        for category, mask in zip(scene.categories, scene.masks):
            rle = mask_util.encode(np.asfortranarray(mask, dtype=np.uint8))
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": category + 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_util.area(rle)),
                "bbox": mask_util.toBbox(rle).tolist(),
                "iscrowd": 0,
            })
    dataset = {
        "info": {"description": "mae-transfer synthetic shapes world", "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CATEGORIES)],
    }
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def _write_ade(root: Path, split: str, count: int, seed: int, size: int) -> None:
    """ADE20K layout: .jpg images as mmseg's ADE20KDataset expects, uint8 .png label maps (0 = background)."""
    ade_split = {"train": "training", "val": "validation"}[split]
    image_dir, label_dir = root / "images" / ade_split, root / "annotations" / ade_split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for i in range(count):
        scene = clutter_scene(_rng(seed, f"seg_{split}", i), size)
        label = np.zeros((size, size), np.uint8)
        for category, mask in zip(scene.categories, scene.masks):
            label[mask] = category + 1
        _save(scene.image, image_dir / f"{i:06d}.jpg")
        _save(label, label_dir / f"{i:06d}.png")


def _write_cls(root: Path, split: str, per_class: int, seed: int, size: int) -> None:
    for label, name in enumerate(CATEGORIES):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            scene = dominant_scene(_rng(seed, f"cls_{split}", label, i), size, label)
            _save(scene.image, root / split / name / f"{i:06d}.png")


def generate_world(out_dir: str | os.PathLike, seed: int = 0, size: str = "small",
                   image_size: int | None = None) -> dict:
    """Write the four datasets of the synthetic world under out_dir and return its description (world.json).

    `size` picks a preset of PRESETS; `image_size` overrides its image side. If out_dir already holds the world
    of these same arguments, nothing is written. The world is built in a sibling folder and moved into place at
    the end, so an interrupted run never leaves a partial world behind; an existing out_dir that is not empty
    and holds another world (or anything else) is an error, never overwritten.
    """
    if size not in PRESETS:
        raise ValueError(f"unknown world size {size!r}: choose one of {sorted(PRESETS)}")
    spec = PRESETS[size] if image_size is None else dataclasses.replace(PRESETS[size], image_size=image_size)
    if spec.image_size < 32:
        raise ValueError(f"image_size {spec.image_size} is too small for the shapes to be told apart: use >= 32")
    out = Path(out_dir).resolve()
    world = {"seed": seed, "size": size, **dataclasses.asdict(spec), "categories": list(CATEGORIES), "layout": _LAYOUT}
    if out.exists() and any(out.iterdir()):
        description = out / "world.json"
        if description.is_file() and json.loads(description.read_text()) == world:
            return world
        raise FileExistsError(f"{out} is not empty and does not hold the world asked for "
                              f"(seed {seed}, size {size}, image_size {spec.image_size}): choose another --out")

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted run
    _write_pretrain(staging / "pretrain" / "train", spec.pretrain, seed, spec.image_size)
    for split in ("train", "val"):
        _write_coco(staging / "coco", split, getattr(spec, f"det_{split}"), seed, spec.image_size)
        _write_ade(staging / "ade", split, getattr(spec, f"seg_{split}"), seed, spec.image_size)
        _write_cls(staging / "cls", split, getattr(spec, f"cls_{split}_per_class"), seed, spec.image_size)
    (staging / "world.json").write_text(json.dumps(world, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, out)  # replaces an empty out_dir too
    return world


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the world into (new or empty)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(PRESETS), default="small")
    parser.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the preset's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        world = generate_world(args.out, args.seed, args.size, args.image_size)
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(f"synthetic world in {args.out} ({time.perf_counter() - start:.1f} s): seed {world['seed']}, "
          f"{world['image_size']}x{world['image_size']} px, categories {', '.join(world['categories'])}")
    counts = {
        "pretrain": f"{world['pretrain']} images",
        "coco": f"{world['det_train']} train / {world['det_val']} val images",
        "ade": f"{world['seg_train']} training / {world['seg_val']} validation images",
        "cls": f"{world['cls_train_per_class']} train / {world['cls_val_per_class']} val images per class",
    }
    for name, path in _LAYOUT.items():
        print(f"  {name:<9}{counts[name]:<50}{path}")


if __name__ == "__main__":
    main()
