"""Pretraining on CUDA: the model under bf16/fp16 autocast through SDPA's flash kernel, and main_pretrain.py's
mixed-precision runs (fp16 with its gradient scaler), which learn, save and resume. Skipped without a CUDA device."""
import json
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mae_transfer.checkpoints import load_training_state
from mae_transfer.models import create_model
from pretrain_helpers import ROOT, make_image_folder, needs_native_bf16, tiny_flags

sys.path.insert(0, str(ROOT / "pretrain"))
import main_pretrain  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0),
                    reason="SDPA's flash kernel needs an Ampere or newer GPU")
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float16])
def test_mae_under_autocast_runs_flash_attention_and_follows_fp32(dtype, fp32_matmuls):
    model = create_model("mae_vit_small_patch16", img_size=64, norm_pix_loss=True).cuda()  # 4x4 patches
    images = torch.randn(4, 3, 64, 64, device="cuda")
    noise = torch.rand(4, 16, device="cuda")
    with torch.no_grad():
        reference = model(images, noise=noise)[0]
        # Restricted to the flash kernel, SDPA raises instead of falling back when it cannot run these inputs.
        with torch.autocast("cuda", dtype=dtype), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            low = model(images, noise=noise)[0]
    assert low.dtype == torch.float32  # the loss is computed in fp32 (forward_loss upcasts)
    assert 0 < abs(low - reference) / reference < 2e-2  # low precision did run, and stays close


@pytest.mark.parametrize("amp", [pytest.param("bf16", marks=needs_native_bf16), "fp16"])
def test_mixed_precision_pretraining_learns_saves_and_resumes(tmp_path, amp):
    make_image_folder(tmp_path / "data", 8)
    out = tmp_path / "out"
    flags = dict(device="cuda", amp=amp, epochs=10, max_steps=16, log_every=2, save_every=4, lr=1e-3)
    main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "data", out, **flags)))
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert steps[-1]["step"] == 16 and steps[-1]["loss"] < steps[0]["loss"]

    state = load_training_state(out / "checkpoint-7.pth")  # 2 iterations per epoch: epoch 7 ends at step 16
    assert state["iteration"] == 16 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert bool(state["scaler"]) == (amp == "fp16")  # only fp16 has a scaler (its scale and growth tracker) to save
    assert state["rng"][0]["cuda"] is not None  # the CUDA generator is part of the resumable state

    main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "data", out, **{**flags, "max_steps": 20},
                                                           resume=out)))
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [r["step"] for r in steps][-2:] == [18, 20]  # continued from step 16, not from the start
    assert load_training_state(out / "checkpoint-9.pth")["iteration"] == 20
