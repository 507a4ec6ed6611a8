from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import param_groups_layer_decay

from mae_transfer.engine import adamw, param_groups, scaled_lr
from mae_transfer.models import layer_decay_scale, mae_vit_tiny_patch16


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_skips_exactly_biases_norms_and_1d_params():
    model = mae_vit_tiny_patch16(img_size=32, depth=2, decoder_depth=1)
    groups = param_groups(model, 0.05)
    decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0.05))
    no_decay = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    # Hand-listed: every bias and every LayerNorm weight is 1-D; nothing else is.
    expected_no_decay = {n for n in trainable if n.endswith(".bias") or ".norm" in n or n.startswith("norm.")
                         or "_norm." in n or n.startswith("decoder_norm.")}
    assert no_decay == expected_no_decay
    assert {"blocks.0.norm1.weight", "norm.weight", "decoder_norm.bias", "patch_embed.proj.bias"} <= no_decay
    # Matrices, the conv and the (N, 1, D) tokens are decayed, as in the reference (timm 0.3.2 add_weight_decay).
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "mask_token",
            "decoder_pred.weight"} <= decay
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable  # fixed sin-cos


def test_layer_decay_scales_follow_the_reference_formula_and_match_timm():
    depth, decay = 4, 0.75
    model = TimmViT(img_size=32, patch_size=16, embed_dim=48, depth=depth, num_heads=3, num_classes=10,
                    global_pool="avg")  # the fine-tuning model: fc_norm + head, no final norm
    ours = param_groups(model, 0.05, no_weight_decay=model.no_weight_decay(),
                        lr_scale=partial(layer_decay_scale, depth=depth, decay=decay))
    scale = {n: g["lr_scale"] for g in ours for n in _names(model, g)}
    wd = {n: g["weight_decay"] for g in ours for n in _names(model, g)}
    # num_layers = depth + 1; embeddings are layer 0, block i layer i + 1, head and fc_norm layer num_layers.
    assert scale["cls_token"] == pytest.approx(decay ** 5)
    assert scale["patch_embed.proj.weight"] == pytest.approx(decay ** 5)
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(decay ** 4)
    assert scale["blocks.3.mlp.fc2.bias"] == pytest.approx(decay ** 1)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert wd["cls_token"] == wd["pos_embed"] == wd["blocks.0.norm1.weight"] == wd["head.bias"] == 0.0
    assert wd["head.weight"] == wd["blocks.2.attn.proj.weight"] == 0.05

    # timm's own layer-decay grouping agrees on this model (the reference fine-tuning layout).
    theirs = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=decay)
    for group in theirs:
        for name in _names(model, group):
            assert scale[name] == pytest.approx(group["lr_scale"]), name
            assert wd[name] == group["weight_decay"], name


def test_lr_scales_with_effective_batch():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # the paper: 64 per GPU x 64 GPUs
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(scaled_lr(1.5e-4, 4096) / 2)
    assert scaled_lr(1e-3, 256) == 1e-3


def test_adamw_uses_mae_betas_and_fused_kernel():
    model = torch.nn.Linear(3, 2)
    opt = adamw(param_groups(model, 0.05), lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"]
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
