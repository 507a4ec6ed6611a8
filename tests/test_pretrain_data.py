import logging
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from mae_transfer.data.images import (ImageFolderDataset, WithMaskNoise, list_images, missing_files, pretrain_transform,
                                      to_rgb)
from mae_transfer.models import masking_noise
from pretrain_helpers import make_image_folder


def test_pretrain_transform_is_the_references_crop_flip_and_normalisation():
    steps = pretrain_transform(32).transforms
    assert [type(step) for step in steps] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                                              transforms.ToTensor, transforms.Normalize]  # no colour augmentation
    crop, flip, _, normalize = steps
    # reference.md: RandomResizedCrop(scale 0.2-1.0, bicubic), the aspect ratio left at its default 3/4-4/3
    assert (crop.size, crop.scale, crop.interpolation) == ((32, 32), (0.2, 1.0), InterpolationMode.BICUBIC)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert flip.p == 0.5
    # ImageNet's statistics: reference.md's detection pixel mean and std (0-255 scale) divided by 255
    assert normalize.mean == pytest.approx((0.485, 0.456, 0.406))
    assert normalize.std == pytest.approx((0.229, 0.224, 0.225))


def test_folders_with_and_without_class_subfolders(tmp_path):
    make_image_folder(tmp_path / "flat", 3)
    files, labels, classes = list_images(tmp_path / "flat")
    assert [f.name for f in files] == ["000.png", "001.png", "002.png"] and labels == [-1] * 3 and classes == []

    make_image_folder(tmp_path / "cls" / "dog", 2)
    make_image_folder(tmp_path / "cls" / "cat" / "nested", 1)
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    files, labels, classes = list_images(tmp_path / "cls")
    assert classes == ["cat", "dog"] and labels == [0, 1, 1] and files[0].parent.name == "nested"

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "missing")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file, not an image folder"):
        list_images(tmp_path / "cls" / "notes.txt")


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    # PIL's convert('RGB') would clip every value over 255: a 16-bit gradient came out 99.6% white.
    values = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I", "I;16")
    image = ImageFolderDataset(tmp_path)[0].input
    assert image.mode == "RGB"
    expected = values.astype(np.int64) >> 8  # 257 * k >> 8 == k: the gradient 0..255
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(image)[..., channel], expected)
    # 32-bit integer images (mode I) are scaled only when their values exceed 8 bits
    as_i = Image.fromarray(values.astype(np.int32))
    assert as_i.mode == "I" and np.array_equal(np.asarray(to_rgb(as_i))[..., 0], expected)
    eight_bit = Image.fromarray(np.full((4, 4), 200, dtype=np.int32))
    assert eight_bit.mode == "I" and (np.asarray(to_rgb(eight_bit)) == 200).all()
    # big-endian 16 bits (PIL's I;16B, as some TIFF and PNG readers give them) alike
    big_endian = Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian))[..., 0], expected)


def test_links_are_followed_but_not_round_a_loop(tmp_path, caplog):
    make_image_folder(tmp_path / "data" / "real", 2)
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "data" / "real")  # a second look at the same folder
    (tmp_path / "data" / "real" / "up").symlink_to(tmp_path / "data")  # a loop
    with caplog.at_level(logging.WARNING):
        files, _, classes = list_images(tmp_path / "data")
    assert classes == ["linked", "real"]
    assert [f.relative_to(tmp_path / "data").as_posix() for f in files] == [
        "linked/000.png", "linked/001.png", "real/000.png", "real/001.png"]
    assert "not following" in caplog.text and "up: it leads back to" in caplog.text


def test_corrupt_images_are_reported_skipped_and_counted(tmp_path, caplog):
    make_image_folder(tmp_path, 8, corrupt=[2, 5])
    dataset = ImageFolderDataset(tmp_path, transform=pretrain_transform(32), seed=0)
    with caplog.at_level(logging.WARNING):
        samples = [dataset[i] for i in range(len(dataset))]
    assert [s.unreadable for s in samples] == [0, 0, 1, 0, 0, 1, 0, 0]
    assert all(s.input.shape == (3, 32, 32) for s in samples)
    assert "002.png" in caplog.text and "005.png" in caplog.text
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert int(batch.unreadable.sum()) == 2

    make_image_folder(tmp_path / "bad", 2, corrupt=[0, 1])
    with pytest.raises(RuntimeError, match="none of the 2 images"):
        ImageFolderDataset(tmp_path / "bad")[0]


def test_an_unreadable_last_image_gives_way_to_the_first_with_its_label(tmp_path):
    make_image_folder(tmp_path / "a", 2)
    make_image_folder(tmp_path / "b", 2, corrupt=[1])  # b/001.png, the last file in sorted order
    dataset = ImageFolderDataset(tmp_path, transform=transforms.ToTensor())
    last, first = dataset[3], dataset[0]
    assert (last.unreadable, last.label) == (1, 0) and torch.equal(last.input, first.input)


def test_sample_randomness_depends_on_seed_epoch_index_only(tmp_path):
    make_image_folder(tmp_path, 6)
    noise_fn = partial(masking_noise, "random", 1, (2, 2), 0.75)
    dataset = ImageFolderDataset(tmp_path, transform=WithMaskNoise(pretrain_transform(32), noise_fn), seed=3)
    image, noise = dataset[4].input
    assert noise.shape == (4,)
    torch.rand(10)  # the global generator's state must not matter
    again, again_noise = dataset[4].input
    assert torch.equal(image, again) and torch.equal(noise, again_noise)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4].input[1], noise)  # a new epoch draws anew

    def batches(num_workers):
        loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
        return [b.input for b in loader]
    for (img0, n0), (img2, n2) in zip(batches(0), batches(2)):  # same data with worker processes
        assert torch.equal(img0, img2) and torch.equal(n0, n2)


def test_missing_files_are_found_by_listing_each_folder(tmp_path):
    make_image_folder(tmp_path / "a", 2)
    (tmp_path / "plain").write_text("a file, not a folder")
    paths = [tmp_path / "a" / "001.png", str(tmp_path / "a" / "007.png"), tmp_path / "nowhere" / "000.png",
             str(tmp_path / "a" / "000.png"), tmp_path / "plain" / "000.png"]
    assert missing_files(paths) == [1, 2, 4]
