"""tools/train_cls.py end to end on generated images: flags, learning, evaluation, freezing, resume."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_transfer.checkpoints import read_checkpoint
from mae_transfer.models import mae_vit_tiny_patch16
from pretrain_helpers import one_thread, run_tool

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_cls.py"
sys.path.insert(0, str(TOOL.parent))
import train_cls  # noqa: E402

COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (50, 60, 220)}


def _blob(rng, rgb, size=40):
    """A disc of the class colour (jittered) at a random place and size on a random grey level, with noise."""
    y, x = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= (rng.uniform(0.25, 0.45) * size) ** 2
    pixels = np.empty((size, size, 3))
    pixels[:] = rng.uniform(40, 220)
    pixels[disc] = np.array(rgb) * rng.uniform(0.7, 1.15)
    pixels += rng.normal(0, 20, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Three classes told apart by the colour of a disc on a grey background: 16 train and 8 val images each."""
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _blob(rng, rgb).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A (randomly initialised) ViT-Tiny MAE encoder in the reference's released layout."""
    path = tmp_path_factory.mktemp("encoder") / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae_vit_tiny_patch16(img_size=32).encoder_state_dict()}, path)
    return path


def flags(data, out, *more, batch_size=8):
    return ["--model", "vit_tiny_patch16", "--input_size", "32", "--data_path", str(data), "--output_dir", str(out),
            "--batch_size", str(batch_size), "--num_workers", "0", "--device", "cpu", "--log_every", "2", *more]


def run(data, out, *more):
    with one_thread():
        return train_cls.main(train_cls.parse_args(flags(data, out, *more)))


def test_defaults_come_from_mode_then_preset_then_flags():
    args = train_cls.parse_args([])
    assert (args.mode, args.blr, args.layer_decay, args.global_pool, args.aa) == (
        "finetune", 1e-3, 0.75, True, "rand-m9-mstd0.5-inc1")
    args = train_cls.parse_args(["--mode", "linprobe"])
    assert (args.blr, args.weight_decay, args.global_pool, args.aa, args.reprob, args.epochs) == (
        0.1, 0.0, False, None, 0.0, 90)
    args = train_cls.parse_args(["--preset", "finetune-base", "--blr", "1e-4", "--cls_token"])
    assert (args.model, args.layer_decay, args.drop_path, args.epochs, args.mixup, args.cutmix) == (
        "vit_base_patch16", 0.65, 0.1, 100, 0.8, 1.0)
    assert (args.blr, args.global_pool, args.effective_batch_size) == (1e-4, False, 1024)
    args = train_cls.parse_args(["--preset", "linprobe-large", "--aa", "none"])
    assert (args.mode, args.blr, args.effective_batch_size, args.aa) == ("linprobe", 0.1, 16384, None)
    args = train_cls.parse_args(["--mode", "partial", "--partial_blocks", "0"])
    assert args.blr == 0.1 and args.global_pool is False  # partial with K = 0 is linear probing


def test_finetuning_learns_and_eval_reproduces_the_final_metrics(blobs, encoder, tmp_path):
    out = tmp_path / "ft"
    metrics = run(blobs, out, "--finetune", str(encoder), "--epochs", "4", "--warmup_epochs", "1",
                  "--lr", "5e-4", "--aa", "none", "--reprob", "0", "--smoothing", "0.1", "--drop_path", "0")
    chance = 100 / 3
    # clearly better than chance, and confidently so: the untrained head (std 2e-5) starts at loss ln 3 = 1.0986
    assert metrics["images"] == 24 and metrics["top1"] >= chance + 40 and metrics["loss"] < 0.8, metrics
    record = json.loads((out / "metrics.json").read_text())
    assert record["final"]["top1"] == metrics["top1"] and record["chance_top1"] == pytest.approx(chance)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3] and epochs[-1]["val_top1"] == metrics["top1"]
    assert any(r["kind"] == "step" and "lr" in r and "loss" in r for r in lines)

    again = run(blobs, tmp_path / "eval", "--eval", "--resume", str(out / "classifier.safetensors"))
    assert again == metrics
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["top1"] == metrics["top1"] and saved["top5"] == metrics["top5"]


def test_linear_probe_leaves_the_encoder_as_loaded(blobs, encoder, tmp_path):
    run(blobs, tmp_path, "--mode", "linprobe", "--finetune", str(encoder), "--epochs", "2",
        "--warmup_epochs", "1", "--max_steps", "3")
    trained = read_checkpoint(tmp_path / "classifier.safetensors")
    assert trained.meta["mode"] == "linprobe"
    pretrained = read_checkpoint(encoder).state_dict
    for name, value in trained.state_dict.items():
        if not name.startswith("head."):
            assert torch.equal(value, pretrained[name]), name
    head = trained.state_dict["head.1.weight"]
    assert head.shape == (3, 192) and not torch.equal(trained.state_dict["head.0.running_mean"],
                                                      torch.zeros(192))


def test_resumed_run_equals_the_uninterrupted_one(blobs, tmp_path):
    flags = ("--warmup_epochs", "1", "--blr", "1e-3", "--save_every", "1", "--mixup", "0.8", "--cutmix", "1.0")
    whole = run(blobs, tmp_path / "whole", "--epochs", "3", *flags)
    run(blobs, tmp_path / "split", "--epochs", "3", "--max_steps", "12", *flags)  # stops after 2 of 3 epochs
    assert not (tmp_path / "split" / "checkpoint-2.pth").exists()
    resumed = run(blobs, tmp_path / "split", "--epochs", "3", "--resume", str(tmp_path / "split"), *flags)
    assert resumed == whole
    a = read_checkpoint(tmp_path / "whole" / "classifier.safetensors").state_dict
    b = read_checkpoint(tmp_path / "split" / "classifier.safetensors").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_with_clear_messages(blobs, tmp_path):
    with pytest.raises(SystemExit, match="--nb_classes 10 but imagefolder .* has 3"):
        run(blobs, tmp_path, "--nb_classes", "10")
    with pytest.raises(SystemExit, match="--eval needs --resume"):
        run(blobs, tmp_path, "--eval")
    with pytest.raises(SystemExit, match="--batch_size 7 must be even"):
        run(blobs, tmp_path, "--mixup", "0.8", "--batch_size", "7")


def test_two_process_gloo_run_matches_one_process_and_dist_eval_counts_every_image_once(blobs, tmp_path):
    common = ("--epochs", "2", "--warmup_epochs", "1", "--lr", "5e-4", "--drop_path", "0", "--dist_eval")
    single = run(blobs, tmp_path / "one", *common)
    assert single["loss"] < 0.9  # it did learn (from ln 3 = 1.0986)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOOL)]
    double = run_tool(torchrun + flags(blobs, tmp_path / "two", *common, batch_size=4))
    assert double.returncode == 0, double.stderr
    assert "effective batch 8 = 4 x 1 (accum) x 2 (processes)" in double.stdout
    # same global batches (per-sample seeded augmentation), averaged gradients: the same model, up to summation
    one = read_checkpoint(tmp_path / "one" / "classifier.safetensors").state_dict
    two = read_checkpoint(tmp_path / "two" / "classifier.safetensors").state_dict
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    sharded = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert sharded["images"] == 24 and sharded["top1"] == single["top1"]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)
