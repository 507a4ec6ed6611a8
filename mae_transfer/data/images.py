"""Image folders for pretraining: any tree of images, with or without class sub-folders.

Three properties matter on long runs:
- A corrupt or unreadable file is reported by path and replaced by the next readable image, so a batch keeps
  its size and the run keeps going; each sample says how many files it skipped, and the training loop counts them.
- With a seed, each sample's randomness (crop, flip, masking noise) comes from a generator seeded by
  (seed, epoch, index) alone: a run gives the same result with any number of processes or loader workers, and a
  resumed run sees exactly the samples the uninterrupted one would have.
- Files are listed once with os.walk and no per-file stat, which matters for ImageNet's 1.28M files.
"""
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

__all__ = ["Sample", "ImageFolderDataset", "list_images", "missing_files", "sample_seed", "to_rgb",
           "pretrain_transform", "center_crop_transform", "whole_images", "WithMaskNoise"]

logger = logging.getLogger(__name__)


class Sample(NamedTuple):
    input: object       # whatever the transform returns (an image tensor, or (image, noise) for pretraining)
    label: int          # class index, or -1 in a folder without class sub-folders
    unreadable: int     # files skipped (unreadable) to produce this sample


def missing_files(paths: Sequence) -> List[int]:
    """The indices of `paths` (str or Path) that do not exist, found by listing each folder once: an annotation
    file's 118k COCO or 1.28M ImageNet images are not one stat each (slow on network filesystems)."""
    by_folder: Dict[str, List[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        by_folder[os.path.dirname(os.fspath(path))].append(i)
    missing: List[int] = []
    for folder, indices in by_folder.items():
        try:
            present = set(os.listdir(folder or "."))
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        missing += [i for i in indices if os.path.basename(os.fspath(paths[i])) not in present]
    return sorted(missing)


def list_images(root: Path) -> Tuple[List[Path], List[int], List[str]]:
    """Image files under `root` in sorted order, their labels and the class names.

    If every image sits inside a top-level sub-folder, those sub-folders are the classes (torchvision's
    ImageFolder convention); otherwise the folder is unlabeled and every label is -1.
    """
    root = Path(root)
    if not root.is_dir():
        raise (NotADirectoryError(f"{root} is a file, not an image folder") if root.exists()
               else FileNotFoundError(f"image folder not found: {root}"))
    files: List[Path] = []
    # Links are followed (datasets are often assembled from links), except back into a folder above: each folder's
    # chain of real paths from the root finds such loops, which would list the same images again and again.
    chains = {str(root): frozenset({os.path.realpath(root)})}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain, kept = chains.pop(dirpath), []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real in chain:
                logger.warning("not following %s: it leads back to %s, which is listed already", path, real)
                continue
            chains[path] = chain | {real}
            kept.append(name)
        dirnames[:] = kept
        files.extend(Path(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and has_file_allowed_extension(f, IMG_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
    top = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files]
    if any(t is None for t in top):
        return files, [-1] * len(files), []
    classes = sorted(set(top))
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[t] for t in top], classes


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. PIL's convert('RGB') clips 16-bit grayscale at 255, turning nearly every pixel white;
    such images (mode I;16, or the 32-bit mode I older Pillows open 16-bit PNGs as, when values exceed 8 bits) are
    scaled to 8 bits first, as OpenCV and mmcv read them."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one sample of one epoch (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class ImageFolderDataset(Dataset):
    """Images under `root` (see `list_images`), decoded to RGB and passed through `transform`.

    `listing`: (files, labels, class names) to read instead of walking `root`, for datasets listed in an
    annotation file.
    """

    def __init__(self, root: Path, transform: Optional[Callable] = None, seed: Optional[int] = None,
                 listing: Optional[Tuple[Sequence[Path], Sequence[int], Sequence[str]]] = None):
        self.root = Path(root)
        files, labels, classes = list_images(self.root) if listing is None else listing
        self.files, self.labels, self.classes = list(files), list(labels), list(classes)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's per-sample randomness (loader workers must be re-created each epoch, the default)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        """Sample `index` for a message: its file."""
        return str(self.files[index])

    def _load(self, index: int) -> Tuple[Image.Image, int, int]:
        """The image at `index`, or the next readable one after it; also returns its index and the skip count."""
        for skipped in range(len(self.files)):
            i = (index + skipped) % len(self.files)
            try:
                with open(self.files[i], "rb") as f:
                    return to_rgb(Image.open(f)), i, skipped
            except Exception as err:  # any decoding failure (PIL raises OSError, ValueError, SyntaxError...)
                logger.warning("skipping unreadable image %s: %s: %s", self.describe(i), type(err).__name__, err)
        raise RuntimeError(f"none of the {len(self.files)} images under {self.root} could be read")

    def __getitem__(self, index: int) -> Sample:
        image, i, skipped = self._load(index)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
                if self.seed is not None:
                    # the CPU generator only: torch.manual_seed would also reseed the GPUs' (drop path) with
                    # --num_workers 0, where samples are drawn in the training process
                    torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                image = self.transform(image)
        return Sample(image, self.labels[i], skipped)


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The MAE pretraining augmentation: RandomResizedCrop(scale 0.2-1, bicubic), horizontal flip, ImageNet norm."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def center_crop_transform(input_size: int) -> transforms.Compose:
    """A whole image at the model's size, for looking at what it makes of it: timm's evaluation transform with no
    crop margin (the short side resized to `input_size`, bicubic; the centre cropped square; ImageNet norm)."""
    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=1.0,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def whole_images(paths: Sequence[Path], input_size: int, count: int) -> torch.Tensor:
    """The first `count` readable images of `paths`, whole (center_crop_transform), as one (N, 3, S, S) batch; an
    unreadable file is skipped with a warning, and none readable is an error naming the first."""
    prepare = center_crop_transform(input_size)
    images = []
    for path in paths:
        if len(images) == count:
            break
        try:
            with Image.open(path) as image:
                images.append(prepare(to_rgb(image)))
        except Exception as err:  # any decoding failure, as in ImageFolderDataset
            logger.warning("skipping unreadable image %s: %s: %s", path, type(err).__name__, err)
    if not images:
        raise FileNotFoundError(f"no readable image among {len(paths)} given (the first: {paths[0]})" if paths
                                else "no images given")
    return torch.stack(images)


class WithMaskNoise:
    """Pairs each transformed image with its masking noise (L,), drawn in the loader workers from the same
    per-sample generator, so which patches are masked is reproducible too."""

    def __init__(self, transform: Callable, noise_fn: Callable[[], torch.Tensor]):
        self.transform = transform
        self.noise_fn = noise_fn  # () -> (1, L), e.g. partial(masking_noise, 'random', 1, grid, mask_ratio)

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.noise_fn()[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, noise={self.noise_fn!r})"
