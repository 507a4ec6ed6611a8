"""Tiny pretraining runs in this process: learning, presets, the exported encoder, a non-finite loss."""
import io
import json
import math
import shutil
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters
from torch.utils.data import DistributedSampler

from mae_transfer.checkpoints import load_training_state, read_checkpoint
from mae_transfer.data.images import ImageFolderDataset, WithMaskNoise, pretrain_transform, whole_images
from mae_transfer.engine import resolve_accum_iter, seed_everything
from mae_transfer.models import MaskedAutoencoderViT, create_model, masking_noise
from pretrain_helpers import ROOT, make_image_folder, one_thread, seed_of_rank_3, tiny_flags

sys.path.insert(0, str(ROOT / "pretrain"))  # main_pretrain.py is a script with sibling imports, like the reference
import main_pretrain  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


def _fixed_batch_loss(model, images, noise):
    model.eval()
    with torch.no_grad():
        return model(images, mask_ratio=0.75, noise=noise)[0].item()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    make_image_folder(tmp / "data" / "train", 8)  # the reference's DATA_PATH/train layout
    args = main_pretrain.parse_args(tiny_flags(tmp / "data", tmp / "out", epochs=10, warmup_epochs=1,
                                               max_steps=16, log_every=2, save_every=4, lr=1e-3))
    main_pretrain.main(args)
    return tmp / "out", args


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_run):
    out, args = tiny_run
    data = ImageFolderDataset(out.parent / "data" / "train", transform=pretrain_transform(32), seed=1)
    images = torch.stack([data[i].input for i in range(4)])  # a fixed batch of augmented training images
    noise = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    seed_everything(args.seed)  # main builds its model right after seeding the same way
    initial = create_model(args.model, img_size=32)
    trained = create_model(args.model, img_size=32)
    trained.load_state_dict(read_checkpoint(out / "mae_full.safetensors").state_dict)
    assert _fixed_batch_loss(trained, images, noise) < 0.8 * _fixed_batch_loss(initial, images, noise)

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(2, 17, 2))  # every 2 iterations, 16 iterations in all
    assert len(epochs) == 8 and epochs[0]["unreadable_images"] == 0 and epochs[-1]["step"] == 16
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert list(out.glob("events.out.tfevents.*"))


def test_the_log_opens_with_a_record_of_what_ran(tiny_run):
    out, _ = tiny_run
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert (record["kind"], record["step"], record["resumed_from"], record["precision"]) == ("run", 0, None, "none")
    assert {k: record["args"][k] for k in ("model", "input_size", "mask_ratio", "masking", "lr", "max_steps")} == {
        "model": "mae_vit_tiny_patch16", "input_size": 32, "mask_ratio": 0.75, "masking": "random", "lr": 1e-3,
        "max_steps": 16}
    assert record["plan"] == {"batch_size": 4, "accum_iter": 1, "world_size": 1, "iters_per_epoch": 2, "effective": 4}
    env = record["environment"]
    assert (env["torch"], env["timm"], env["numpy"], env["world_size"], env["device"]) == (
        torch.__version__, timm.__version__, np.__version__, 1, "cpu")
    assert env["mae_transfer_path"] == str(ROOT / "mae_transfer")
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True) if shutil.which("git") else None
    if (ROOT / ".git").exists() and head and head.returncode == 0:  # the commit, "-dirty" when tracked files changed
        changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--"]).returncode == 1
        assert env["source_commit"] == head.stdout.strip() + ("-dirty" if changed else "")
    else:  # not a checkout, or one git refuses (safe.directory)
        assert env["source_commit"] is None


def test_every_checkpoint_shows_its_reconstructions(tiny_run):
    out, _ = tiny_run
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    # checkpoints at epochs 0, 4 and 7 (--save_every 4; --max_steps stopped epoch 7), 2 iterations per epoch
    pictures = events.Images("reconstructions")
    assert [e.step for e in pictures] == [2, 10, 16]
    with Image.open(out / "reconstructions.png") as last:  # 4 rows of 4 tiles, 32 px shown at 160
        assert last.size == (4 * (160 + 4) + 4, 18 + 4 * (160 + 4) + 4)
        last = np.asarray(last.convert("RGB"))
    masked = np.s_[18:, 4 + 164:4 + 164 + 160]  # the second column: the images as masked
    drawn = [np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")) for e in pictures]
    assert np.array_equal(drawn[-1], last)
    assert all(np.array_equal(d[masked], last[masked]) for d in drawn)  # same images, same masks each time
    assert not all(np.array_equal(d, last) for d in drawn)  # ... and what the model makes of them changes


def test_the_pictured_images_are_distinct_and_readable(tmp_path):
    few = ImageFolderDataset(tmp_path / "two", listing=(make_image_folder(tmp_path / "two", 2), [-1] * 2, []))
    images = main_pretrain.preview_images(few, 32)
    assert len(images) == 2 and not torch.equal(images[0], images[1])
    paths = make_image_folder(tmp_path / "five", 5, corrupt=[0])
    five = ImageFolderDataset(tmp_path / "five", listing=(paths, [-1] * 5, []))
    # picks 0, 1, 2, 3 of 5; file 0 cannot be read, so the first other readable file (4) stands in
    expected = whole_images([paths[i] for i in (1, 2, 3, 4)], 32, 4)
    assert torch.equal(main_pretrain.preview_images(five, 32), expected)


def test_epochs_reshuffle_and_redraw_the_lr_follows_the_effective_batch_and_only_whole_epochs_are_saved(
        tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", 8)
    batches = []

    def recording_step(model, batch, **kwargs):
        (images, noise), _, _ = batch
        batches.append((images.clone(), noise.clone()))
        return mae_step(model, batch, **kwargs)

    mae_step = main_pretrain.mae_step
    monkeypatch.setattr(main_pretrain, "mae_step", recording_step)
    # 8 images, batches of 2 accumulated by 2: 4 iterations an epoch; 3 optimizer steps end halfway through epoch 1
    args = main_pretrain.parse_args(tiny_flags(tmp_path / "data", tmp_path / "out", batch_size=2, accum_iter=2,
                                               max_steps=3, blr=1e-2))
    main_pretrain.main(args)

    assert args.lr == pytest.approx(1e-2 * 4 / 256)  # the reference's lr = blr * effective batch / 256
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*.pth")) == ["checkpoint-0.pth"]
    assert load_training_state(tmp_path / "out" / "checkpoint-0.pth")["iteration"] == 4
    # Each epoch's first batch: DistributedSampler's order for (seed, epoch), each sample's crop and masking drawn
    # for (seed, epoch, index), as an independent loader over the same folder gives them.
    dataset = ImageFolderDataset(tmp_path / "data", seed=0, transform=WithMaskNoise(
        pretrain_transform(32), partial(masking_noise, "random", 1, (2, 2), 0.75)))
    for epoch, (images, noise) in ((0, batches[0]), (1, batches[4])):
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        expected = [dataset[i].input for i in list(sampler)[:2]]
        assert torch.equal(images, torch.stack([image for image, _ in expected]))
        assert torch.equal(noise, torch.stack([n for _, n in expected]))
    assert not torch.equal(batches[0][0], batches[4][0])


def test_each_process_seeds_with_the_run_seed_plus_its_rank(tmp_path, monkeypatch):
    args = main_pretrain.parse_args(tiny_flags(tmp_path, tmp_path / "out", seed=7))
    # the reference's seed + rank: each GPU its own masks and crops
    assert seed_of_rank_3(main_pretrain, lambda dist: main_pretrain.pretrain(args, dist), monkeypatch) == 10


def test_exported_encoder_loads_strictly_into_timm(tiny_run):
    out, _ = tiny_run
    ckpt = read_checkpoint(out / "encoder.safetensors")
    assert ckpt.kind == "encoder" and ckpt.meta["model"] == "mae_vit_tiny_patch16"
    assert not any(k.startswith(("decoder", "mask_token")) for k in ckpt.state_dict)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0)
    model.load_state_dict(ckpt.state_dict, strict=True)
    # The same weights give the same features in timm's ViT as in ours (timm's default LayerNorm eps is 1e-6 too).
    ours = create_model("vit_tiny_patch16", img_size=32)
    ours.load_state_dict(ckpt.state_dict)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval().forward_features(x), ours.eval().forward_features(x))


def test_training_state_checkpoints_are_reference_style_readable(tiny_run):
    out, _ = tiny_run
    ckpt = read_checkpoint(out / "checkpoint-7.pth")  # the last complete epoch before --max_steps
    assert ckpt.kind == "full" and ckpt.extras["epoch"] == 7 and ckpt.extras["iteration"] == 16


def test_presets_reproduce_the_documented_recipe():
    args = main_pretrain.parse_args(["--preset", "large-1600"])
    assert (args.model, args.epochs, args.blr, args.weight_decay, args.warmup_epochs, args.norm_pix_loss,
            args.mask_ratio, args.input_size) == ("mae_vit_large_patch16", 1600, 1.5e-4, 0.05, 40, True, 0.75, 224)
    def accum_iter(args, world_size):
        return resolve_accum_iter(args.batch_size, world_size, accum_iter=args.accum_iter,
                                  effective_batch_size=args.effective_batch_size)
    assert accum_iter(args, world_size=8) == 8  # 64 x 8 x 8 GPUs = 4096
    assert accum_iter(args, world_size=64) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        accum_iter(args, world_size=3)
    explicit = main_pretrain.parse_args(["--preset", "base-800", "--no-norm_pix_loss", "--blr", "1e-3"])
    assert (explicit.norm_pix_loss, explicit.blr, explicit.epochs) == (False, 1e-3, 800)
    # Without a preset the reference's own argparse defaults hold.
    plain = main_pretrain.parse_args([])
    assert (plain.blr, plain.epochs, plain.norm_pix_loss, plain.accum_iter) == (1e-3, 400, False, None)
    assert accum_iter(plain, world_size=2) == 1


def test_an_explicit_accum_iter_replaces_the_preset_s_effective_batch():
    args = main_pretrain.parse_args(["--preset", "base-800", "--accum_iter", "4"])
    assert (args.accum_iter, args.effective_batch_size, args.blr) == (4, None, 1.5e-4)
    both = main_pretrain.parse_args(["--preset", "base-800", "--accum_iter", "4", "--effective_batch_size", "2048"])
    with pytest.raises(ValueError, match="contradicts"):  # both given: the user's contradiction, said so
        resolve_accum_iter(64, 4, accum_iter=both.accum_iter, effective_batch_size=both.effective_batch_size)


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio", "0"], "--mask_ratio 0.0: must be above 0 and below 1"),
    (["--mask_ratio", "1"], "--mask_ratio 1.0: must be above 0 and below 1"),
    (["--save_every", "0"], "argument --save_every: 0 is not a positive integer"),
    (["--log_every", "0"], "argument --log_every: 0 is not a positive integer"),
    (["--accum_iter", "0"], "argument --accum_iter: 0 is not a positive integer"),
    (["--batch_size", "-1"], "argument --batch_size: -1 is not a positive integer"),
    (["--output_dir", ""], "argument --output_dir: empty: name the folder"),
])
def test_flags_that_cannot_work_are_refused_when_parsed(flags, message, capsys):
    with pytest.raises(SystemExit):
        main_pretrain.parse_args(flags)
    assert message in capsys.readouterr().err


def test_an_input_size_that_is_no_multiple_of_the_patch_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--input_size 70: image size 70 is not a multiple of the patch size 16"):
        main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "data", tmp_path / "out", input_size=70)))


def test_the_reference_commands_paste():
    # PRETRAIN.md's flags, as torch.distributed.launch (torch >= 2.0) passes them with its --local-rank.
    args = main_pretrain.parse_args(["--local-rank=3", "--batch_size", "64", "--model", "mae_vit_large_patch16",
                                     "--norm_pix_loss", "--mask_ratio", "0.75", "--epochs", "800",
                                     "--warmup_epochs", "40", "--blr", "1.5e-4", "--weight_decay", "0.05",
                                     "--data_path", "/imagenet", "--world_size", "8", "--dist_url", "env://"])
    assert (args.model, args.batch_size, args.epochs, args.blr, args.norm_pix_loss, args.local_rank) == (
        "mae_vit_large_patch16", 64, 800, 1.5e-4, True, 3)
    assert main_pretrain.parse_args(["--local_rank", "1"]).local_rank == 1  # the spelling of torch < 2.0
    with pytest.raises(SystemExit):  # another rendezvous is torchrun's business: refused, not ignored
        main_pretrain.parse_args(["--dist_url", "tcp://10.0.0.1:23456"])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", 8)
    calls = []
    forward_loss = MaskedAutoencoderViT.forward_loss

    def failing_loss(self, imgs, pred, mask):
        loss = forward_loss(self, imgs, pred, mask)
        if not torch.is_grad_enabled():  # the reconstructions a checkpoint shows
            return loss
        calls.append(1)
        return loss * math.nan if len(calls) == 4 else loss  # iteration 3: epoch 1, iteration 1

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", failing_loss)
    args = main_pretrain.parse_args(tiny_flags(tmp_path / "data", tmp_path / "out", epochs=3, log_every=5))
    args.batch_size = 4  # 2 iterations per epoch
    with pytest.raises(SystemExit, match=r"loss is nan at step 3 \(epoch 1, iteration 1\).*checkpoint-0\.pth"):
        main_pretrain.main(args)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-0.pth"]
    state = load_training_state(tmp_path / "out" / "checkpoint-0.pth")
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "error" and records[-1]["step"] == 3


def test_compiled_training_follows_the_eager_run(tmp_path):
    # --compile (torch.compile, Inductor's C++ kernels on CPU) must train the same model: the same logged losses and
    # the same reconstructions afterwards. Not bit for bit: fused kernels sum in another order.
    make_image_folder(tmp_path / "data", 8)
    runs = {}
    for name, compile_flag in (("eager", None), ("compiled", True)):
        out = tmp_path / name
        torch._dynamo.reset()
        counters.clear()
        main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "data", out, epochs=2, log_every=1,
                                                               compile=compile_flag)))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        model = create_model("mae_vit_tiny_patch16", img_size=32)
        model.load_state_dict(read_checkpoint(out / "mae_full.safetensors").state_dict)
        runs[name] = [r["loss"] for r in records if r["kind"] == "step"], model
    # The whole step is one graph (the loader draws the masking noise), compiled once for the run: no graph break
    # leaves parts of it to eager mode on a GPU, and no recompilation costs minutes there.
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    (eager_losses, eager), (compiled_losses, compiled) = runs["eager"], runs["compiled"]
    assert len(eager_losses) == 4 and compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    torch.testing.assert_close(compiled.eval()(images, noise=noise)[1], eager.eval()(images, noise=noise)[1],
                               rtol=1e-3, atol=1e-4)


def test_bf16_autocast_pretraining_follows_fp32_on_cpu(tmp_path):
    # The engine's mixed-precision path (what --amp bf16 runs on a GPU) on the CPU's bf16 kernels: the step does
    # run in bf16 (its losses are not fp32's), yet follows the fp32 run, and the weights it saves stay fp32.
    make_image_folder(tmp_path / "data", 8)
    losses = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp
        main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "data", out, epochs=4, log_every=1,
                                                               amp=amp)))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[amp] = [r["loss"] for r in records if r["kind"] == "step"]
        state = load_training_state(out / "checkpoint-3.pth")
        assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert len(losses["bf16"]) == 8 and losses["bf16"] != losses["none"]
    assert losses["bf16"] == pytest.approx(losses["none"], rel=2e-3)  # 1.4e-4 at most, seen
