"""tools/train_cls.py end to end on generated images: flags, learning, evaluation, freezing, resume."""
import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from mae_transfer.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from mae_transfer.cls import build_classifier
from mae_transfer.models import mae_vit_tiny_patch16
from pretrain_helpers import as_reference_checkpoint, one_thread, run_tool, seed_of_rank_3

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


def test_the_reference_fine_tuning_command_pastes():
    # FINETUNE.md's ViT-B command after `python -m torch.distributed.launch --nproc_per_node=8`, which adds
    # --local-rank; its flags mean what they mean there.
    args = train_cls.parse_args(["--local-rank=0", "--accum_iter", "4", "--batch_size", "32", "--model",
                                 "vit_base_patch16", "--finetune", "mae_pretrain_vit_base.pth", "--epochs", "100",
                                 "--blr", "5e-4", "--layer_decay", "0.65", "--weight_decay", "0.05", "--drop_path",
                                 "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--dist_eval",
                                 "--data_path", "/imagenet"])
    assert (args.accum_iter, args.batch_size, args.blr, args.layer_decay, args.drop_path, args.mixup, args.cutmix,
            args.reprob, args.dist_eval, args.global_pool) == (4, 32, 5e-4, 0.65, 0.1, 0.8, 1.0, 0.25, True, True)
    # main_finetune.py's --resplit is accepted and, as there, changes nothing else
    with_resplit, without = vars(train_cls.parse_args(["--resplit"])), vars(train_cls.parse_args([]))
    assert with_resplit.pop("resplit") and not without.pop("resplit") and with_resplit == without


LOGITS = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]


def _cross_entropy_by_hand(soft_targets):
    """mean over rows of sum_j t_j * -log p_j, p = softmax of LOGITS."""
    total = 0.0
    for row, target in zip(LOGITS, soft_targets):
        log_z = math.log(sum(math.exp(v) for v in row))
        total += sum(t * (log_z - v) for t, v in zip(target, row))
    return total / len(LOGITS)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_criterion_without_mixup_smooths_the_labels(smoothing):
    args = train_cls.parse_args(["--smoothing", str(smoothing), "--mixup", "0", "--cutmix", "0"])
    mixup = train_cls.build_mixup(args, 3)
    assert mixup is None
    criterion = train_cls.build_criterion(args, mixup)
    labels = [0, 2]
    # (1 - eps) * CE + eps * mean_j(-log p_j): the one-hot target moved by eps towards uniform
    smoothed = [[(1 - smoothing) * (j == label) + smoothing / 3 for j in range(3)] for label in labels]
    value = criterion(torch.tensor(LOGITS), torch.tensor(labels)).item()
    assert value == pytest.approx(_cross_entropy_by_hand(smoothed), rel=1e-6)


def test_criterion_with_mixup_takes_mixed_soft_targets_and_mixup_gets_the_flags():
    args = train_cls.parse_args(["--mixup", "0.6", "--cutmix", "0.5", "--mixup_prob", "0.7", "--mixup_switch_prob",
                                 "0.3", "--mixup_mode", "pair", "--smoothing", "0.2"])
    mixup = train_cls.build_mixup(args, 3)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.cutmix_minmax, mixup.mix_prob, mixup.switch_prob,
            mixup.mode, mixup.label_smoothing, mixup.num_classes) == (0.6, 0.5, None, 0.7, 0.3, "pair", 0.2, 3)
    criterion = train_cls.build_criterion(args, mixup)
    assert isinstance(criterion, SoftTargetCrossEntropy)  # Mixup has smoothed the targets: no second smoothing
    soft = [[0.7, 0.2, 0.1], [0.0, 0.4, 0.6]]
    value = criterion(torch.tensor(LOGITS), torch.tensor(soft)).item()
    assert value == pytest.approx(_cross_entropy_by_hand(soft), rel=1e-6)

    # cutmix_minmax alone turns mixing on
    args = train_cls.parse_args(["--mixup", "0", "--cutmix", "0", "--cutmix_minmax", "0.3", "0.8"])
    assert train_cls.build_mixup(args, 3).cutmix_minmax == [0.3, 0.8]


def test_best_before_a_resume_is_read_from_the_epoch_records(tmp_path):
    def epoch(n, top1):
        return json.dumps({"kind": "epoch", "step": n, "epoch": n, "train_loss": 1.0, "val_top1": top1,
                           "val_loss": n / 10})
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([
        json.dumps({"kind": "step", "step": 1, "epoch": 0, "loss": 1.0}),
        epoch(0, 50.0), epoch(1, 90.0), epoch(2, 95.0),  # a trajectory abandoned by resuming after epoch 0
        epoch(1, 60.0), '{"kind": "epoch", "epo',       # ... its replacement, then a line cut by a kill
        epoch(2, 60.0), epoch(3, 99.0)]) + "\n")        # epoch 3 is after the checkpoint resumed from
    # epochs 1 and 2 tie at 60 by their last records: the earlier wins, as in an uninterrupted run
    assert train_cls.best_before(log, 3) == {"top1": 60.0, "loss": 0.1, "epoch": 1}
    assert train_cls.best_before(log, 1) == {"top1": 50.0, "loss": 0.0, "epoch": 0}
    assert train_cls.best_before(tmp_path / "missing.jsonl", 3) == {}


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


def test_bf16_autocast_finetuning_follows_fp32_on_cpu(blobs, encoder, tmp_path):
    # --amp bf16's path (training with mixup and evaluation, under autocast) on the CPU's bf16 kernels: it does run
    # in bf16, follows the fp32 run, and saves fp32 weights.
    metrics = {amp: run(blobs, tmp_path / amp, "--finetune", str(encoder), "--epochs", "2", "--warmup_epochs", "1",
                        "--lr", "5e-4", "--aa", "none", "--reprob", "0", "--drop_path", "0", "--amp", amp)
               for amp in ("none", "bf16")}
    assert metrics["bf16"]["loss"] != metrics["none"]["loss"]
    assert metrics["bf16"]["loss"] == pytest.approx(metrics["none"]["loss"], rel=2e-3)  # 1.5e-4 apart, seen
    weights = read_checkpoint(tmp_path / "bf16" / "classifier.safetensors").state_dict
    assert {v.dtype for v in weights.values()} == {torch.float32}


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


def test_eval_builds_the_classifier_its_checkpoint_records_unless_flags_say_otherwise(blobs, encoder, tmp_path):
    final = run(blobs, tmp_path / "probe", "--mode", "linprobe", "--finetune", str(encoder), "--epochs", "2",
                "--warmup_epochs", "1", "--max_steps", "2")
    path = tmp_path / "probe" / "classifier.safetensors"
    # no --model, --mode, --input_size or pooling flag: a linear probe of ViT-Tiny at 32 px on the cls token
    given = ["--eval", "--resume", str(path), "--data_path", str(blobs), "--output_dir", str(tmp_path / "eval"),
             "--batch_size", "8", "--num_workers", "0", "--device", "cpu"]
    args = train_cls.parse_args(given)
    assert (args.model, args.mode, args.global_pool, args.input_size, args.partial_blocks) == (
        "vit_tiny_patch16", "linprobe", False, 32, 0)
    with one_thread():
        assert train_cls.main(args) == final
    args = train_cls.parse_args(given + ["--input_size", "48", "--global_pool", "--model", "vit_small_patch16"])
    assert (args.model, args.mode, args.global_pool, args.input_size) == ("vit_small_patch16", "linprobe", True, 48)
    # The reference's main_linprobe records no --mode: its BatchNorm head says it is a linear probe.
    reference = tmp_path / "checkpoint-89.pth"
    torch.save({"model": read_checkpoint(path).state_dict, "epoch": 89,
                "args": argparse.Namespace(model="vit_tiny_patch16", input_size=32)}, reference)
    args = train_cls.parse_args([*given[:2], str(reference), *given[3:]])
    assert (args.model, args.mode, args.input_size) == ("vit_tiny_patch16", "linprobe", 32)
    # The reference's mae_finetuned_*.pth records nothing: model, input size and pooling are read off its tensors.
    finetuned = tmp_path / "mae_finetuned_vit_tiny.pth"
    torch.save({"model": build_classifier("vit_tiny_patch16", 3, img_size=48).state_dict()}, finetuned)
    args = train_cls.parse_args([*given[:2], str(finetuned), *given[3:]])
    assert (args.model, args.mode, args.global_pool, args.input_size) == ("vit_tiny_patch16", "finetune", True, 48)


def test_eval_counts_and_reports_an_unreadable_val_image(blobs, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(blobs / "val", data / "val")
    (data / "val" / "red" / "3.png").write_bytes(b"\x89PNG truncated")  # 4.png stands in for it
    classifier = build_classifier("vit_tiny_patch16", 3, img_size=32)
    save_checkpoint(tmp_path / "classifier.safetensors", classifier.state_dict())
    metrics = run(data, tmp_path / "eval", "--eval", "--resume", str(tmp_path / "classifier.safetensors"))
    assert (metrics["images"], metrics["unreadable_images"]) == (24, 1)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["unreadable_images"] == 1
    assert "(1 unreadable val image(s), each counted as the next readable one)" in capsys.readouterr().out


def test_resumed_run_equals_the_uninterrupted_one(blobs, tmp_path):
    flags = ("--warmup_epochs", "1", "--blr", "1e-3", "--save_every", "1", "--mixup", "0.8", "--cutmix", "1.0")
    whole = run(blobs, tmp_path / "whole", "--epochs", "3", *flags)
    run(blobs, tmp_path / "split", "--epochs", "3", "--max_steps", "12", *flags)  # stops after 2 of 3 epochs
    assert not (tmp_path / "split" / "checkpoint-2.pth").exists()
    with pytest.raises(CheckpointError, match="holds checkpoint-1.pth of an earlier run: add --resume"):
        run(blobs, tmp_path / "split", "--epochs", "3", *flags)  # would overwrite checkpoint-0 and -1
    resumed = run(blobs, tmp_path / "split", "--epochs", "3", "--resume", str(tmp_path / "split"), *flags)
    assert resumed == whole
    # the split run's log records both of its parts, each with its settings as resolved
    runs = [r for r in map(json.loads, (tmp_path / "split" / "log.jsonl").read_text().splitlines())
            if r["kind"] == "run"]
    assert [(r["step"], r["args"]["start_epoch"], r["args"]["max_steps"]) for r in runs] == [(0, 0, 12), (12, 2, None)]
    assert runs[0]["resumed_from"] is None and runs[1]["resumed_from"] == str(tmp_path / "split" / "checkpoint-1.pth")
    assert all(r["args"]["lr"] == pytest.approx(1e-3 * 8 / 256) and r["plan"]["iters_per_epoch"] == 6 for r in runs)
    # metrics.json's best is the whole run's: the highest val top-1 in the log, its earliest epoch
    records = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    top = next(r for r in epochs if r["val_top1"] == max(e["val_top1"] for e in epochs))
    best = {**{k[len("val_"):]: v for k, v in top.items() if k.startswith("val_")}, "epoch": top["epoch"]}
    assert best["epoch"] < 2  # before the resume point, or the resumed run would find it without the log
    for name in ("whole", "split"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["best"] == best, name
    a = read_checkpoint(tmp_path / "whole" / "classifier.safetensors").state_dict
    b = read_checkpoint(tmp_path / "split" / "classifier.safetensors").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fc_norm_after_head(keys):
    """The order of models_vit.py's global-pool classifier: fc_norm is added after timm 0.3.2 built the head."""
    return [k for k in keys if not k.startswith("fc_norm.")] + [k for k in keys if k.startswith("fc_norm.")]


def _layer_decay_groups(names, shapes):
    """The reference's optimizer groups for fine-tuning (util/lr_decay.py, param_groups_lrd): one per layer and
    decay, in the order their first parameter comes; no decay for 1-D parameters, cls_token and pos_embed."""
    depth = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks."))
    groups = {}
    for name in names:
        layer = (0 if name in ("cls_token", "pos_embed") or name.startswith("patch_embed") else
                 int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1)
        decay = "no_decay" if len(shapes[name]) == 1 or name in ("cls_token", "pos_embed") else "decay"
        groups.setdefault(f"layer_{layer}_{decay}", []).append(name)
    return list(groups.values())


def test_a_fine_tuning_run_of_the_reference_scripts_resumes_where_it_stopped(blobs, tmp_path):
    """main_finetune.py's global-pool classifier registers fc_norm after the head, and its optimizer numbers the
    parameters in that order: resumed by name, the run (without mixup or drop path, nothing it draws depends on the
    generators the reference does not record) continues as the uninterrupted one."""
    flags = ("--warmup_epochs", "1", "--blr", "1e-3", "--save_every", "1", "--drop_path", "0", "--global_pool")
    whole = run(blobs, tmp_path / "whole", "--epochs", "3", *flags)
    run(blobs, tmp_path / "ours", "--epochs", "3", "--max_steps", "12", *flags)
    (tmp_path / "split").mkdir()
    as_reference_checkpoint(tmp_path / "ours" / "checkpoint-1.pth", tmp_path / "split" / "checkpoint-1.pth",
                            order=_fc_norm_after_head, groups=_layer_decay_groups)
    assert run(blobs, tmp_path / "split", "--epochs", "3", "--resume", str(tmp_path / "split"), *flags) == whole


def test_each_process_seeds_with_the_run_seed_plus_its_rank(blobs, tmp_path, monkeypatch):
    """As the reference (seed + rank): otherwise every GPU draws the same drop-path masks and mixup pairs."""
    args = train_cls.parse_args(flags(blobs, tmp_path, "--seed", "7"))
    assert seed_of_rank_3(train_cls, lambda dist: train_cls.transfer(args, dist), monkeypatch) == 10


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
    # every image counted once; the models agree only to 1e-4, so an image on a near-tie may flip: one at most
    assert sharded["images"] == single["images"] == 24
    hits = [round(m["top1"] * 24 / 100) for m in (sharded, single)]
    assert abs(hits[0] - hits[1]) <= 1
    # the mean loss, continuous in the logits, would show a dropped or doubled image (~1/24 of an image's loss)
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-4)


def test_two_process_run_resumed_equals_the_uninterrupted_one(blobs, tmp_path):
    """Each process's generators (drop path: torch's; Mixup/CutMix: NumPy's) are saved per rank and restored to
    their rank: a 2-process run stopped after 2 of 3 epochs and resumed ends bit for bit where the whole run does."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TOOL)]
    common = ("--epochs", "3", "--warmup_epochs", "1", "--blr", "1e-3", "--save_every", "1", "--drop_path", "0.1",
              "--mixup", "0.8", "--cutmix", "1.0")

    def launch(out, *more):
        result = run_tool(torchrun + flags(blobs, out, *common, *more, batch_size=4))
        assert result.returncode == 0, result.stderr

    launch(tmp_path / "whole")
    launch(tmp_path / "split", "--max_steps", "12")  # 6 steps an epoch at global batch 8: stops after epoch 1
    assert not (tmp_path / "split" / "checkpoint-2.pth").exists()
    launch(tmp_path / "split", "--resume", str(tmp_path / "split"))
    a = read_checkpoint(tmp_path / "whole" / "classifier.safetensors").state_dict
    b = read_checkpoint(tmp_path / "split" / "classifier.safetensors").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
