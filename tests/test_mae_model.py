from contextlib import contextmanager
from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mae_transfer.models import (ARCHS, DECODERS, MaskedAutoencoderViT, create_model, mae_vit_base_patch16,
                                 sincos_pos_embed_2d, vit_tiny_patch16)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(**kw):
    return MaskedAutoencoderViT(**{**TINY, **kw})


def patch_pixels(img, i, j, p):
    """One patch's pixels in the reference's (p, p, c) order, by slicing."""
    return img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_is_mse_over_masked_patches_only(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    total, count = 0.0, 0
    for n in range(2):
        for idx in range(16):
            if mask[n, idx] == 0:
                continue
            target = patch_pixels(imgs[n], idx // 4, idx % 4, 8)
            if norm_pix:
                target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
            total += ((pred[n, idx] - target) ** 2).mean()
            count += 1
    assert count == 2 * 12
    assert torch.allclose(loss, total / count, atol=1e-6)


def test_visible_patches_do_not_enter_the_loss():
    model = tiny_mae()
    imgs = torch.randn(1, 3, 32, 32)
    _, pred, mask = model(imgs, mask_ratio=0.75)
    visible = int((mask[0] == 0).nonzero()[0])
    changed = imgs.clone()
    i, j = divmod(visible, 4)
    changed[0, :, i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] += 10.0
    assert torch.equal(model.forward_loss(imgs, pred, mask), model.forward_loss(changed, pred, mask))


def test_noise_fixes_the_kept_patches():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss_a, pred_a, mask_a = model(imgs, noise=noise)
    loss_b, pred_b, mask_b = model(imgs, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.equal(pred_a, pred_b)
    assert torch.equal(mask_a, (noise.argsort(1).argsort(1) >= 4).float())


def test_patchify_roundtrip():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    patches = model.patchify(imgs)
    assert torch.equal(patches[1, 6], patch_pixels(imgs[1], 1, 2, 8))
    assert torch.equal(model.unpatchify(patches), imgs)


@contextmanager
def cuda_autocast(dtype):
    """CUDA autocast's dispatch on tensors faked as CUDA (FakeTensorMode), so its casts show on a CPU-only machine;
    torch.autocast('cuda') would disable itself here."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        try:
            yield
        finally:
            torch.set_autocast_enabled("cuda", was_enabled)
            torch.set_autocast_dtype("cuda", was_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_targets_keep_fp32_under_cuda_autocast(dtype):
    # CUDA autocast casts einsum, the reference's way to patchify, to bf16/fp16: the targets would be rounded.
    model = tiny_mae()
    with cuda_autocast(dtype):
        imgs = torch.empty(2, 3, 32, 32, device="cuda")
        assert torch.einsum("nchw->nhwc", imgs).dtype == dtype  # the fake autocast is in force
        assert model.patchify(imgs).dtype == torch.float32
        assert model.unpatchify(model.patchify(imgs)).dtype == torch.float32


def test_encoder_matches_timm_vit_with_the_same_weights():
    ours = vit_tiny_patch16(img_size=32, patch_size=8, depth=2).eval()
    peer = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0,
                   norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    peer.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = peer.forward_features(imgs)
        assert torch.allclose(ours.forward_features(imgs), expected, atol=1e-5)
        # The masked path with nothing masked and the identity order is the same computation.
        latent, mask, _ = ours.forward_masked(imgs, 0.0, noise=torch.arange(16.0).expand(2, 16))
    assert mask.sum() == 0
    assert torch.allclose(latent, expected, atol=1e-5)


def reference_keys(depth, decoder_depth):
    """The MAE reference's full-model state-dict keys, written out from its models_mae.py layout."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    encoder = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
               + [f"blocks.{i}.{k}" for i in range(depth) for k in block] + ["norm.weight", "norm.bias"])
    decoder = (["mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
               + [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block]
               + ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"])
    return encoder, decoder


def test_reference_layouts_load_strictly():
    model = tiny_mae()
    encoder_keys, decoder_keys = reference_keys(depth=2, decoder_depth=1)
    assert sorted(model.state_dict()) == sorted(encoder_keys + decoder_keys)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    full = {k: torch.randn(shapes[k]) for k in encoder_keys + decoder_keys}
    model.load_state_dict(full, strict=True)
    encoder = vit_tiny_patch16(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    encoder.load_state_dict({k: full[k] for k in encoder_keys}, strict=True)
    assert sorted(model.encoder_state_dict()) == sorted(encoder_keys)


def test_reference_sizes_and_builders():
    assert ARCHS["base"] == dict(embed_dim=768, depth=12, num_heads=12)
    assert ARCHS["large"] == dict(embed_dim=1024, depth=24, num_heads=16)
    assert ARCHS["huge"] == dict(embed_dim=1280, depth=32, num_heads=16)
    assert all(DECODERS[a] == dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
               for a in ("base", "large", "huge"))
    model = mae_vit_base_patch16(norm_pix_loss=True)
    assert model.norm_pix_loss and model.patch_embed.num_patches == 196
    assert model.pos_embed.shape == (1, 197, 768) and not model.pos_embed.requires_grad
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 197 * (768 + 512)
    with pytest.raises(ValueError, match="unknown model 'mae_vit_gigantic'"):
        create_model("mae_vit_gigantic")


def test_attention_uses_sdpa():
    # timm's Attention dispatches to F.scaled_dot_product_attention (flash / mem-efficient kernels on GPU).
    assert all(blk.attn.fused_attn for blk in tiny_mae().blocks)


def test_initialisation_follows_the_reference():
    """reference.md: fixed 2-D sin-cos tables (checked by hand in test_pos_embed.py), xavier-uniform linears and
    patch projection (as a linear on flattened patches), N(0, 0.02) tokens, LayerNorm 1/0, zero biases."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    assert torch.equal(model.pos_embed, sincos_pos_embed_2d(64, (8, 8)))
    assert torch.equal(model.decoder_pos_embed, sincos_pos_embed_2d(32, (8, 8)))
    proj = model.patch_embed.proj.weight.flatten(1)  # (64, 3 * 8 * 8)
    bound = (6 / sum(proj.shape)) ** 0.5
    assert proj.abs().max() <= bound and proj.abs().max() > 0.9 * bound  # U(-b, b) fills its range
    fc1 = model.blocks[0].mlp.fc1.weight  # (256, 64)
    assert fc1.abs().max() <= (6 / sum(fc1.shape)) ** 0.5
    for token in (model.cls_token, model.mask_token):
        assert token.abs().max() < 0.02 * 5 and token.std() > 0.01
    tokens = torch.cat([model.cls_token.flatten(), model.mask_token.flatten()])
    assert abs(tokens.std().item() - 0.02) < 0.004  # 96 draws of N(0, 0.02)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
