"""The ViTDet backbone: pyramid shapes at a non-square input, and our ViT (SDPA attention, torch checkpointing)
against detectron2's own ViT with the same weights, forward and backward."""
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import ViT as Detectron2ViT

from mae_transfer.det import ViT, global_attention_blocks, vitdet_arch
from pretrain_helpers import needs_native_bf16

CONFIG = Path(__file__).resolve().parents[1] / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"

# ViT-Tiny's width and heads, 3 blocks: window attention in the first two (4x4 windows, padded where the token grid
# does not divide), global in the last; relative positions for a 8x8 grid, absolute ones for a 4x4 grid + cls row.
VIT = dict(img_size=128, patch_size=16, embed_dim=192, depth=3, num_heads=3, window_size=4, window_block_indexes=[0, 1],
           use_rel_pos=True, pretrain_img_size=64, drop_path_rate=0.0)


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Relative positions start at zero, where a wrong bias layout cannot show: give every tensor random values."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def test_pyramid_p2_to_p6_at_a_non_square_input():
    cfg = LazyConfig.load(str(CONFIG))
    cfg.model.backbone.net.update(depth=2, window_block_indexes=[0])
    cfg.model.backbone.square_pad = 0  # the detector pads batches to a square; the backbone itself takes any size
    backbone = instantiate(cfg.model.backbone).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 96, 160))
    channels = cfg.model.backbone.out_channels
    # Strides 4, 8, 16, 32 from the 6x10 stride-16 map; p6 is p5 max-pooled with kernel 1, stride 2: ceil(3/2) x 5.
    expected = {"p2": (24, 40), "p3": (12, 20), "p4": (6, 10), "p5": (3, 5), "p6": (2, 3)}
    assert {k: tuple(v.shape) for k, v in features.items()} == {k: (2, channels, *hw) for k, hw in expected.items()}
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.mark.parametrize("size", [(128, 128), (96, 160)], ids=["square", "non-square"])
def test_stride16_feature_equals_detectron2_vit(size):
    ours = _randomised(ViT(**VIT)).eval()
    theirs = Detectron2ViT(**VIT).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the same parameters under the same names
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        a, b = ours(x)["last_feat"], theirs(x)["last_feat"]
    assert a.shape == (2, 192, size[0] // 16, size[1] // 16)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_detectron2s_gradients():
    ours = _randomised(ViT(**VIT, use_act_checkpoint=True)).train()
    theirs = Detectron2ViT(**VIT).train()  # its own checkpointing needs fairscale: the plain forward is the truth
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 96, 160)
    target = torch.randn(2, 192, 6, 10)
    for model in (ours, theirs):
        ((model(x)["last_feat"] - target) ** 2).mean().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ours.blocks[2].attn.rel_pos_h.grad.abs().sum() > 0  # the relative-position bias is trained


def test_vitdet_arch_puts_global_attention_in_vitdets_blocks():
    assert global_attention_blocks(12) == [2, 5, 8, 11]
    assert global_attention_blocks(24) == [5, 11, 17, 23]
    assert global_attention_blocks(32) == [7, 15, 23, 31]
    base = vitdet_arch("base")
    assert (base["embed_dim"], base["depth"], base["num_heads"]) == (768, 12, 12)
    assert base["window_block_indexes"] == [0, 1, 3, 4, 6, 7, 9, 10]  # detectron2's mask_rcnn_vitdet.py
    with pytest.raises(ValueError, match="unknown ViT size 'giant'"):
        vitdet_arch("giant")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_attention_gives_detectron2s_gradients(fp32_matmuls):
    """On a GPU, SDPA runs the relative-position bias through a fused kernel (memory-efficient or cuDNN) whose
    gradient for the mask is its own code: every gradient, the tables' included, must be detectron2's (an explicit
    softmax)."""
    ours = _randomised(ViT(**VIT)).cuda().train()
    theirs = Detectron2ViT(**VIT).cuda().train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 96, 160, device="cuda")
    target = torch.randn(2, 192, 6, 10, device="cuda")
    for model in (ours, theirs):
        ((model(x)["last_feat"] - target) ** 2).mean().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    assert ours.blocks[2].attn.rel_pos_h.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float16])
def test_cuda_autocast_follows_detectron2_in_fp32_and_trains(dtype, fp32_matmuls):
    """On CUDA under autocast the relative-position bias reaches SDPA in the queries' dtype (a float32 mask with
    bf16 queries would raise), the features follow detectron2's own ViT run in fp32, and a GradScaler step reaches
    every parameter, the relative-position tables included (their gradient flows through SDPA's mask)."""
    ours = _randomised(ViT(**VIT)).cuda().eval()
    theirs = Detectron2ViT(**VIT).cuda().eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 96, 160, device="cuda")
    with torch.no_grad():
        reference = theirs(x)["last_feat"]
        with torch.autocast("cuda", dtype=dtype):
            low = ours(x)["last_feat"]
    error = (low.float() - reference).norm() / reference.norm()
    assert 0 < error < 2e-2  # low precision did run, and stays close

    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        loss = ours.train()(x)["last_feat"].float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
    assert ours.blocks[2].attn.rel_pos_h.grad.abs().sum() > 0
