"""tools/visualize_mae.py and tools/benchmark_pretrain.py on tiny models."""
import argparse
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae_transfer.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from mae_transfer.models import MaskedAutoencoderViT, apply_masking, mae_vit_tiny_patch16, masking_noise
from mae_transfer.visualization import reconstruct
from pretrain_helpers import ROOT, make_image_folder, one_thread, tiny_flags

sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "pretrain"))
import benchmark_pretrain  # noqa: E402
import main_pretrain  # noqa: E402
import visualize_mae  # noqa: E402


def _tiny_mae(**kwargs):
    torch.manual_seed(0)
    return mae_vit_tiny_patch16(img_size=32, depth=2, **kwargs)


def test_reconstructions_leave_the_caller_s_generator_and_mode_alone():
    # Pretraining shows reconstructions at every checkpoint: its training must go on as if it had not.
    model = mae_vit_tiny_patch16(img_size=32).train()
    images = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    first = reconstruct(model, images, 0.75, "block", seed=3)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    torch.manual_seed(123)  # another state of the caller's generator: the masks come from the seed alone
    assert all(np.array_equal(v, reconstruct(model, images, 0.75, "block", seed=3)[k]) for k, v in first.items())


def test_reconstruction_panels_paste_visible_patches_back(tmp_path):
    path = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": _tiny_mae().state_dict()}, path)  # the reference's full-model layout
    model = visualize_mae.build_model(read_checkpoint(path), norm_pix_loss=False)
    images = visualize_mae.load_images(make_image_folder(tmp_path / "img", 2), 32, limit=4)
    panels = reconstruct(model, images, 0.75, "random", seed=5)

    torch.manual_seed(5)
    _, mask, _ = apply_masking(torch.zeros(2, 4, 1), 0.75, masking_noise("random", 2, (2, 2), 0.75))
    removed = mask.reshape(2, 2, 2).repeat_interleave(16, 1).repeat_interleave(16, 2).bool().numpy()
    original, masked = panels["original"], panels["masked"]
    recon, pasted = panels["reconstruction"], panels["reconstruction + visible"]
    assert removed.sum() == 2 * 3 * 16 * 16  # 3 of 4 patches removed per image
    assert (masked[~removed] == original[~removed]).all() and (pasted[~removed] == original[~removed]).all()
    assert (pasted[removed] == recon[removed]).all()
    mean_colour = np.round(np.array([0.485, 0.456, 0.406]) * 255)
    assert (masked[removed] == mean_colour).all()  # removed patches are blank (zero after normalisation)


def test_a_checkpoint_without_metadata_rebuilds_its_own_decoder(tmp_path):
    """The reference's files record no head counts, which shape no tensor: a decoder of the wrong head count would
    load silently. The tiny MAE's 128-wide decoder has 4 heads (the reference's 512-wide one 16)."""
    original = _tiny_mae().eval()
    path = tmp_path / "checkpoint-3.pth"
    torch.save({"model": original.state_dict()}, path)
    model = visualize_mae.build_model(read_checkpoint(path), norm_pix_loss=False)
    assert model.decoder_blocks[0].attn.num_heads == original.decoder_blocks[0].attn.num_heads == 4
    images = torch.randn(2, 3, 32, 32)
    for key, panel in reconstruct(model, images, 0.75, "random").items():
        assert np.array_equal(panel, reconstruct(original, images, 0.75, "random")[key]), key
    odd = mae_vit_tiny_patch16(img_size=32, depth=2, decoder_embed_dim=96, decoder_num_heads=3)
    torch.save({"model": odd.state_dict()}, path)
    with pytest.raises(CheckpointError, match="decoder width 96 is no known MAE size"):
        visualize_mae.build_model(read_checkpoint(path), norm_pix_loss=False)


def test_a_training_checkpoint_draws_as_its_run_trained(tmp_path):
    """A checkpoint-N.pth records its run's flags, not metadata: the targets and a head count given by flag (which
    shapes no tensor) come from them, so it draws exactly as the run's exported mae_full.safetensors does."""
    make_image_folder(tmp_path / "img", 8)
    with one_thread():
        main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "img", tmp_path / "run", epochs=1,
                                                               warmup_epochs=0, norm_pix_loss=True,
                                                               decoder_num_heads=2)))
    state = read_checkpoint(tmp_path / "run" / "checkpoint-0.pth")
    assert state.meta["norm_pix_loss"] is True and state.decoder_num_heads == 2  # the width alone says 4
    pictures = []
    for checkpoint in ("checkpoint-0.pth", "mae_full.safetensors"):
        out = tmp_path / f"{checkpoint}.png"
        visualize_mae.main(["--checkpoint", str(tmp_path / "run" / checkpoint), "--images", str(tmp_path / "img"),
                            "--out", str(out)])
        pictures.append(np.asarray(Image.open(out)))
    assert np.array_equal(*pictures)
    # The reference's training checkpoints record a Namespace; its model's name gives the head counts.
    reference = tmp_path / "checkpoint-9.pth"
    torch.save({"model": _tiny_mae().state_dict(), "epoch": 9,
                "args": argparse.Namespace(model="mae_vit_tiny_patch16", norm_pix_loss=True)}, reference)
    recorded = read_checkpoint(reference)
    assert recorded.meta["norm_pix_loss"] is True and recorded.decoder_num_heads == 4


def test_normalised_pixel_predictions_are_mapped_back_with_each_patch_statistics(tmp_path, monkeypatch):
    """A model that predicts its norm_pix_loss targets exactly (reference.md: each patch's pixels minus their mean,
    over sqrt(unbiased variance + 1e-6)) is drawn as the original image, to 8-bit rounding."""
    model = _tiny_mae(norm_pix_loss=True).eval()
    images = visualize_mae.load_images(make_image_folder(tmp_path / "img", 2), 32, limit=2)

    def perfect(imgs, mask_ratio, noise):
        _, _, mask = MaskedAutoencoderViT.forward(model, imgs, mask_ratio=mask_ratio, noise=noise)
        patches = model.patchify(imgs)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, unbiased=True, keepdim=True)
        return None, (patches - mean) / (var + 1e-6) ** 0.5, mask

    monkeypatch.setattr(model, "forward", perfect)
    panels = reconstruct(model, images, 0.75, "random")
    error = np.abs(panels["reconstruction"].astype(int) - panels["original"].astype(int))
    assert error.max() <= 1


def test_visualize_cli_writes_a_grid_and_refuses_encoder_only(tmp_path, capsys):
    model = _tiny_mae(norm_pix_loss=True)
    full, encoder = tmp_path / "mae_full.safetensors", tmp_path / "encoder.safetensors"
    save_checkpoint(full, model.state_dict(), {"norm_pix_loss": True, "decoder_num_heads": 4, "num_heads": 3})
    save_checkpoint(encoder, model.encoder_state_dict(), {"num_heads": 3})
    make_image_folder(tmp_path / "img", 3)
    out = tmp_path / "grid.png"
    visualize_mae.main(["--checkpoint", str(full), "--images", str(tmp_path / "img"), "--out", str(out),
                        "--masking", "grid"])
    with Image.open(out) as grid:  # 4 columns and 3 rows of 160 px tiles (32 px x 5), 4 px gaps, 18 px titles
        assert grid.size == (4 * 164 + 4, 18 + 3 * 164 + 4)
    with pytest.raises(CheckpointError, match="cannot reconstruct"):
        visualize_mae.main(["--checkpoint", str(encoder), "--images", str(tmp_path / "img")])
    with pytest.raises(SystemExit):  # before any work: PIL would refuse the name only once the picture is drawn
        visualize_mae.main(["--checkpoint", str(full), "--images", str(tmp_path / "img"), "--out", "recon"])
    assert "--out recon: no image format has that extension" in capsys.readouterr().err


def test_flop_count_equals_the_hand_formula():
    model = _tiny_mae()  # D 192, 2 blocks; decoder 128 wide, 2 blocks; 4 patches of 16x16x3, 1 visible
    D, Dd, P, L, T = 192, 128, 16 * 16 * 3, 4, 2  # T: visible patches + cls
    encoder = 2 * (24 * T * D * D + 4 * T * T * D)  # qkv, proj, fc1, fc2 and the two attention matmuls per block
    decoder = 2 * (24 * (L + 1) * Dd * Dd + 4 * (L + 1) ** 2 * Dd)
    patch_embed, rest = 2 * L * P * D, 2 * T * D * Dd + 2 * (L + 1) * Dd * P
    forward = patch_embed + encoder + decoder + rest
    # Backward costs twice the forward, except the patch embedding, which needs no gradient for the pixels.
    expected = 3 * forward - patch_embed
    counted = benchmark_pretrain.count_flops(lambda x: model(x, mask_ratio=0.75)[0], torch.randn(1, 3, 32, 32))
    assert counted == expected

    # Table 2's baseline: the same model with its encoder over every patch (L + 1 tokens) and no unshuffling.
    baseline = benchmark_pretrain.EncoderWithMaskTokens(model)
    encoder_all = 2 * (24 * (L + 1) * D * D + 4 * (L + 1) ** 2 * D)
    forward_all = patch_embed + encoder_all + decoder + 2 * (L + 1) * D * Dd + 2 * (L + 1) * Dd * P
    counted = benchmark_pretrain.count_flops(lambda x: baseline(x, mask_ratio=0.75), torch.randn(1, 3, 32, 32))
    assert counted == 3 * forward_all - patch_embed


def test_benchmark_prints_the_table(capfd):
    benchmark_pretrain.main(["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "2",
                             "--warmup", "1", "--steps", "1", "--device", "cpu", "--threads", "1", "--rounds", "2",
                             "--profile", "1"])
    out = capfd.readouterr().out  # the rows' processes print their profiles: capfd sees their output too
    profiled = [line.split(":")[0] for line in out.splitlines() if ": 1 profiled steps" in line]
    assert profiled == ["row 'ours'", "row 'mask_tokens'", "row 'transformers'"]  # each once: the first round only
    for row in ("ours (encoder on visible patches)", "ours, encoder w/ mask tokens", "ViTMAE", "matmul peak",
                "at equal matmul speed", "Table 2 speed-up", "ours / transformers", "median over 2 rounds"):
        assert row in out
    assert out.count("x (rounds ") == 4  # two ratios, each raw and at equal matmul speed


def test_benchmark_profile_lists_the_step_s_operators(capsys):
    model = mae_vit_tiny_patch16(img_size=32)
    step = benchmark_pretrain.make_step(model, lambda m, x: m(x, mask_ratio=0.75)[0], torch.device("cpu"), None, False)
    benchmark_pretrain.print_profile("ours", step, torch.randn(2, 3, 32, 32), steps=3)
    out = capsys.readouterr().out
    assert "row 'ours': 3 profiled steps" in out
    calls = {line.split()[0]: int(line.split()[-1]) for line in out.splitlines() if line.strip().startswith("aten::")}
    assert calls["aten::_fused_adamw_"] == 3 * 2  # one fused update per step and parameter group (decay, no decay)


def test_benchmark_ratio_is_the_median_of_ratios_within_a_round():
    # Round 2 ran at half speed throughout: its rows are slower, but its ratio is the same as round 1's and 3's.
    base = [dict(step_s=1.0), dict(step_s=2.0), dict(step_s=1.0)]
    rows = [dict(step_s=3.0), dict(step_s=6.0), dict(step_s=3.3)]
    ratios = benchmark_pretrain.round_ratios(rows, base, "step_s")
    assert ratios == pytest.approx([3.0, 3.0, 3.3])
    assert benchmark_pretrain.format_ratios(ratios) == "3.00x (rounds 3.00-3.30)"
    assert benchmark_pretrain.format_ratios(ratios[:1]) == "3.00x"
