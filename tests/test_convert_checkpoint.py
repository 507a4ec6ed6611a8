"""tools/convert_checkpoint.py: exact round trips through every output format, timm as a peer loader, and
resizing for another image or patch size."""
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close
from timm.models import load_checkpoint
from timm.models.vision_transformer import VisionTransformer as TimmViT
from transformers import ViTMAEModel

from convert_helpers import ROOT, load_tool, smooth_images, tiny_mae
from mae_transfer.checkpoints import load_into, read_checkpoint, save_checkpoint
from mae_transfer.checkpoints.convert import TARGETS
from mae_transfer.cls import build_classifier
from mae_transfer.models import sincos_pos_embed_2d, vit_tiny_patch16
from pretrain_helpers import subprocess_env

convert_tool = load_tool("convert_checkpoint")


def _encoder(key: str) -> bool:
    return not key.startswith(("mask_token", "decoder_"))


def _backbone(key: str) -> bool:
    return _encoder(key) and not key.startswith(("head.", "fc_norm."))


# What each output format keeps of a checkpoint, written out independently of the converter's own table.
KEPT = {"mae": lambda k: True,
        "timm": _encoder,
        "hf": lambda k: True,
        "detectron2": lambda k: _backbone(k) and k != "cls_token" and not k.startswith("norm."),
        "mmseg": _backbone}
DST = {"mae": "out.pth", "timm": "out.safetensors", "hf": "out", "detectron2": "out.pth", "mmseg": "out.pth"}


def convert(*argv) -> None:
    assert convert_tool.main([str(a) for a in argv]) == 0


def test_every_output_format_is_covered():
    assert set(TARGETS) == set(KEPT) == {"mae", "timm", "hf", "detectron2", "mmseg"}


@pytest.mark.parametrize("to", sorted(KEPT))
def test_ours_to_each_format_and_back_is_exact(tmp_path, to, capsys):
    sd = tiny_mae().state_dict()
    src = save_checkpoint(tmp_path / "ours.safetensors", sd, {"num_heads": 3, "decoder_num_heads": 4})
    convert(src, tmp_path / DST[to], "--to", to)
    back = read_checkpoint(tmp_path / DST[to])
    assert back.format == to
    expected = {k: v for k, v in sd.items() if KEPT[to](k)}
    assert sorted(back.state_dict) == sorted(expected)
    assert all(torch.equal(back.state_dict[k], v) and back.state_dict[k].dtype == v.dtype for k, v in expected.items())
    report = capsys.readouterr().out
    dropped = len(sd) - len(expected)
    assert (f"dropped {dropped} tensors:" if dropped else "dropped nothing") in report


@pytest.mark.parametrize("to", ["mae", "timm", "detectron2", "mmseg"])
def test_finetuned_model_to_each_format_and_back_is_exact(tmp_path, to):
    sd = vit_tiny_patch16(img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10).state_dict()
    torch.save({"model": sd}, tmp_path / "mae_finetuned_vit_tiny.pth")
    convert(tmp_path / "mae_finetuned_vit_tiny.pth", tmp_path / DST[to], "--to", to)
    back = read_checkpoint(tmp_path / DST[to]).state_dict
    expected = {k: v for k, v in sd.items() if KEPT[to](k)}
    assert sorted(back) == sorted(expected) and all(torch.equal(back[k], v) for k, v in expected.items())


def test_encoder_only_and_half_precision(tmp_path):
    mae = tiny_mae().to(torch.bfloat16)
    torch.save({"model": mae.state_dict()}, tmp_path / "full.pth")
    convert(tmp_path / "full.pth", tmp_path / "enc.pth", "--to", "mae", "--encoder-only")
    back = read_checkpoint(tmp_path / "enc.pth")
    assert back.kind == "encoder" and sorted(back.state_dict) == sorted(mae.encoder_state_dict())
    assert all(v.dtype == torch.bfloat16 for v in back.state_dict.values())
    convert(tmp_path / "full.pth", tmp_path / "hf", "--to", "hf")
    assert read_checkpoint(tmp_path / "hf").state_dict["blocks.1.attn.qkv.bias"].dtype == torch.bfloat16


def test_a_reader_that_stops_reading_does_not_stop_the_conversion(tmp_path):
    sd = tiny_mae().state_dict()
    torch.save({"model": sd}, tmp_path / "full.pth")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(tmp_path / "full.pth"),
                             str(tmp_path / "out.pth"), "--to", "mae"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(), text=True)
    proc.stdout.close()  # as `| head` does once it has its lines: here before the first one is printed
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "nothing was written" not in err, err
    back = read_checkpoint(tmp_path / "out.pth").state_dict
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_containers_are_what_each_host_reads(tmp_path):
    src = tmp_path / "full.pth"
    torch.save({"model": tiny_mae().state_dict()}, src)
    for to in ("mae", "detectron2", "mmseg", "timm"):
        convert(src, tmp_path / to / DST[to], "--to", to)
    assert list(torch.load(tmp_path / "mae" / "out.pth", weights_only=True)) == ["model"]
    d2 = torch.load(tmp_path / "detectron2" / "out.pth", weights_only=True)
    assert list(d2) == ["model"] and all(k.startswith("backbone.net.") for k in d2["model"])
    assert "layers.0.attn.qkv.weight" in torch.load(tmp_path / "mmseg" / "out.pth", weights_only=True)
    with safe_open(str(tmp_path / "timm" / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and "blocks.0.attn.qkv.weight" in f.keys()


def _timm_vit(**kw) -> TimmViT:
    return TimmViT(**{**dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0), **kw})


def test_timm_loads_the_encoder_strictly_and_computes_our_features(tmp_path):
    mae = tiny_mae()
    torch.save({"model": mae.state_dict()}, tmp_path / "mae_pretrain_vit_tiny_full.pth")
    convert(tmp_path / "mae_pretrain_vit_tiny_full.pth", tmp_path / "vit.safetensors", "--to", "timm")
    vit = _timm_vit().eval()
    load_checkpoint(vit, str(tmp_path / "vit.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # our MAE encoder path with nothing masked, in patch order, vs timm's forward
        latent, _, _ = mae.forward_masked(x, 0.0, noise=torch.arange(16.0).expand(2, 16))
        assert_close(vit.forward_features(x), latent, atol=1e-5, rtol=0)


def test_timm_loads_a_finetuned_classifier_strictly(tmp_path):
    ours = vit_tiny_patch16(img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10).eval()
    torch.save({"model": ours.state_dict()}, tmp_path / "ft.pth")
    convert(tmp_path / "ft.pth", tmp_path / "ft.safetensors", "--to", "timm")
    vit = _timm_vit(global_pool="avg", num_classes=10).eval()
    load_checkpoint(vit, str(tmp_path / "ft.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(vit(x), ours(x), atol=1e-5, rtol=0)


def _linear_probe(**kw):
    """A trained-looking linear probe (ours and main_linprobe's head): BatchNorm statistics far from 0 and 1."""
    net = build_classifier("vit_tiny_patch16", 10, mode="linprobe", img_size=32, patch_size=8, depth=2, **kw)
    g = torch.Generator().manual_seed(0)
    bn, linear = net.head
    bn.running_mean.copy_(torch.randn(192, generator=g) * 3)
    bn.running_var.copy_(torch.rand(192, generator=g) * 5 + 0.01)
    linear.weight.data.normal_(generator=g)
    linear.bias.data.normal_(generator=g)
    return net.eval()


@pytest.mark.parametrize("global_pool", [False, True])
def test_timm_loads_a_linear_probe_with_its_batchnorm_folded_into_the_head(tmp_path, capsys, global_pool):
    ours = _linear_probe(global_pool=global_pool)
    torch.save({"model": ours.state_dict()}, tmp_path / "linprobe.pth")  # as main_linprobe saves it
    convert(tmp_path / "linprobe.pth", tmp_path / "lp.safetensors", "--to", "timm")
    assert "head.0.* (BatchNorm1d without affine, eps 1e-06) folded into head.1.*" in capsys.readouterr().out
    vit = _timm_vit(global_pool="avg" if global_pool else "token", num_classes=10).eval()
    load_checkpoint(vit, str(tmp_path / "lp.safetensors"), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = ours(x)
        assert_close(vit(x), expected, atol=1e-6 * expected.abs().max().item(), rtol=0)  # float32 rounding


def test_a_linear_probe_written_for_the_reference_keeps_its_batchnorm_head(tmp_path):
    """The reference's layout holds main_linprobe's head as it is (head.0 BatchNorm, head.1 Linear): only a host
    whose head is one Linear (timm) gets it folded."""
    sd = _linear_probe().state_dict()
    torch.save({"model": sd}, tmp_path / "linprobe.pth")
    convert(tmp_path / "linprobe.pth", tmp_path / "out.pth", "--to", "mae")
    back = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_encoder_only_leaves_a_finetuned_model_s_head_and_fc_norm_out(tmp_path, capsys):
    sd = vit_tiny_patch16(img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10).state_dict()
    torch.save({"model": sd}, tmp_path / "mae_finetuned_vit_tiny.pth")
    convert(tmp_path / "mae_finetuned_vit_tiny.pth", tmp_path / "enc.safetensors", "--to", "timm", "--encoder-only")
    back = read_checkpoint(tmp_path / "enc.safetensors")
    assert back.kind == "encoder"
    assert sorted(back.state_dict) == sorted(k for k in sd if not k.startswith(("head.", "fc_norm.")))
    assert "dropped 4 tensors:\n    fc_norm.*, head.*: --encoder-only" in capsys.readouterr().out


def test_a_batchnorm_head_with_affine_parameters_is_not_folded(tmp_path, capsys):
    sd = _linear_probe().state_dict()
    sd["head.0.weight"], sd["head.0.bias"] = torch.ones(192), torch.zeros(192)
    torch.save({"model": sd}, tmp_path / "affine.pth")
    assert convert_tool.main([str(tmp_path / "affine.pth"), str(tmp_path / "out.safetensors"), "--to", "timm"]) == 1
    err = capsys.readouterr().err
    assert "affine.pth: a head timm's one Linear can hold is a linear probe's" in err and "head.0.weight" in err
    assert not (tmp_path / "out.safetensors").exists()


def enlarge_each_patch(x: torch.Tensor, patch: int, new_patch: int) -> torch.Tensor:
    n, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(n, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, patch, patch)
    patches = F.interpolate(patches, size=(new_patch, new_patch), mode="bicubic", antialias=True)
    return patches.reshape(n, gh, gw, c, new_patch, new_patch).permute(0, 3, 1, 4, 2, 5).reshape(
        n, c, gh * new_patch, gw * new_patch)


def test_patch_resampling_keeps_the_output_on_a_smooth_input(tmp_path):
    mae = tiny_mae()
    torch.save({"model": mae.encoder_state_dict()}, tmp_path / "p8.pth")
    # Patch 8 -> 16 at twice the image size: the same 4x4 grid, each patch seeing the same content, enlarged.
    convert(tmp_path / "p8.pth", tmp_path / "p16.safetensors", "--to", "timm", "--patch-size", "16",
            "--img-size", "64")
    vit = _timm_vit(img_size=64, patch_size=16).eval()
    load_checkpoint(vit, str(tmp_path / "p16.safetensors"), strict=True)
    with torch.no_grad():
        # Exact when each patch is enlarged on its own, by the resize the kernel was inverted for (FlexiViT);
        # merely interpolating the kernel would be ~30% off here.
        x = torch.randn(2, 3, 32, 32)
        assert_close(vit.forward_features(enlarge_each_patch(x, 8, 16)), mae.forward_features(x), atol=1e-4, rtol=0)
        # Close when a smooth image is enlarged as a whole.
        x = smooth_images(2, 32)
        before = mae.forward_features(x)
        after = vit.forward_features(F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False))
    assert (after - before).norm() / before.norm() < 0.03

    # --patch-size alone keeps the image size: a 2x2 grid of 16-pixel patches at 32 pixels.
    convert(tmp_path / "p8.pth", tmp_path / "p16_32.pth", "--to", "mae", "--patch-size", "16")
    arch = read_checkpoint(tmp_path / "p16_32.pth").arch()
    assert (arch["patch_size"], arch["img_size"]) == (16, 32)
    assert read_checkpoint(tmp_path / "p16_32.pth").state_dict["pos_embed"].shape == (1, 1 + 2 * 2, 192)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_decoder_table_is_still_recognised_as_the_fixed_one(tmp_path, dtype):
    mae = tiny_mae()
    torch.save({"model": {k: v.to(dtype) for k, v in mae.state_dict().items()}}, tmp_path / "half.pth")
    convert(tmp_path / "half.pth", tmp_path / "half64.pth", "--to", "mae", "--img-size", "64")
    table = read_checkpoint(tmp_path / "half64.pth").state_dict["decoder_pos_embed"]
    assert table.dtype == dtype and torch.equal(table, sincos_pos_embed_2d(128, (8, 8)).to(dtype))


def test_a_decoder_table_that_is_not_the_sin_cos_one_is_interpolated_like_pos_embed(tmp_path):
    sd = tiny_mae().state_dict()
    sd["decoder_pos_embed"] = torch.randn_like(sd["decoder_pos_embed"])  # (1, 1 + 4*4, 128): e.g. a learned one
    torch.save({"model": sd}, tmp_path / "learned.pth")
    convert(tmp_path / "learned.pth", tmp_path / "learned64.pth", "--to", "mae", "--img-size", "64")
    table = read_checkpoint(tmp_path / "learned64.pth").state_dict["decoder_pos_embed"]
    grid = sd["decoder_pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert_close(table, torch.cat([sd["decoder_pos_embed"][:, :1], by_hand], dim=1), rtol=0, atol=1e-6)


def test_image_resizing_matches_transformers_interpolation_and_recomputes_the_decoder_table(tmp_path):
    mae = tiny_mae(norm_pix_loss=True)
    torch.save({"model": mae.state_dict()}, tmp_path / "full32.pth")
    convert(tmp_path / "full32.pth", tmp_path / "full64.pth", "--to", "mae", "--img-size", "64")
    resized = read_checkpoint(tmp_path / "full64.pth")
    assert resized.state_dict["pos_embed"].shape == (1, 1 + 8 * 8, 192)
    assert torch.equal(resized.state_dict["decoder_pos_embed"], sincos_pos_embed_2d(128, (8, 8)))
    big = tiny_mae(img_size=64, norm_pix_loss=True)
    load_into(big, resized.state_dict, dropped=())  # every tensor fits a model built at 64

    # transformers resizes the 32-pixel table itself at forward time, as the reference does (bicubic, no
    # antialiasing; timm's dynamic_img_size antialiases, which changes the bicubic kernel even when enlarging).
    convert(tmp_path / "full32.pth", tmp_path / "hf32", "--to", "hf", "--encoder-only")
    hf = ViTMAEModel.from_pretrained(tmp_path / "hf32").eval()
    x, noise = smooth_images(2, 64), torch.rand(2, 64)
    with torch.no_grad():
        latent, _, _ = big.forward_masked(x, 0.75, noise=noise)
        expected = hf(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        assert_close(latent, expected, atol=1e-4, rtol=0)
        assert torch.isfinite(big(x)[0])

    # Up and back down: a smooth table survives, and so does the output.
    convert(tmp_path / "full64.pth", tmp_path / "enc32.pth", "--to", "mae", "--img-size", "32", "--encoder-only")
    again = tiny_mae()
    load_into(again, read_checkpoint(tmp_path / "enc32.pth").state_dict, new=["mask_token", "decoder_*"])
    x = smooth_images(2, 32)
    with torch.no_grad():
        before, after = mae.forward_features(x), again.forward_features(x)
    assert (after - before).norm() / before.norm() < 0.01  # 0.7 with no position embedding at all


def test_a_table_for_a_non_square_grid_is_converted_as_it_is_and_never_resized(tmp_path, capsys):
    """A segmentation backbone trained on 32 x 48 crops: a cls row over 2 x 3 patches, 7 rows, which hold no square
    grid. Once this table was read as a 2 x 2 grid under 3 prefix rows and 'resized' into garbage."""
    vit = vit_tiny_patch16(img_size=(32, 48), depth=2)
    src = save_checkpoint(tmp_path / "crops.safetensors", vit.state_dict(), {"num_heads": 3})
    assert read_checkpoint(src).arch()["img_size"] is None
    convert(src, tmp_path / "timm.safetensors", "--to", "timm")  # no resizing asked: every tensor as it is
    assert "a non-square patch grid" in capsys.readouterr().out
    written = read_checkpoint(tmp_path / "timm.safetensors").state_dict
    assert all(torch.equal(written[k], v) for k, v in vit.state_dict().items())
    for argv, refusal in ((["--to", "mae", "--img-size", "64"], r"--img-size / --patch-size: pos_embed \(1, 7, 192\) "
                                                                 r"is not 0 or 1 prefix row\(s\) plus a square grid"),
                          (["--to", "hf", "--encoder-only"], r"position embedding \(1, 7, 192\) is no square grid")):
        assert convert_tool.main([str(src), str(tmp_path / DST[argv[1]]), *argv]) == 1
        assert re.search(refusal, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crops.safetensors", "timm.safetensors"]
