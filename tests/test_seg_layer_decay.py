"""Layer-wise lr decay of ViTBackbone segmentors through mmengine's optimizer-wrapper constructor."""
from pathlib import Path

import pytest

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import mae_transfer.seg  # noqa: E402,F401  (registers ViTBackbone and the constructor)
from mae_transfer.checkpoints import FORMATS  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "seg_configs" / "upernet_mae_vit_tiny_synthetic_64x64.py"
register_all_modules()


def _groups(model, optim_wrapper_cfg):
    optimizer = build_optim_wrapper(model, optim_wrapper_cfg).optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(g["params"][0])]: g for g in optimizer.param_groups}


@pytest.fixture(scope="module")
def tiny():
    cfg = Config.fromfile(str(CONFIG))
    cfg.model.backbone.update(embed_dim=64, depth=4, num_heads=4, out_indices=(0, 1, 2, 3))  # layers 0 .. 5
    cfg.model.neck.embed_dim = 64
    cfg.model.decode_head.in_channels = [64] * 4
    cfg.model.auxiliary_head.in_channels = 64
    cfg.optim_wrapper.paramwise_cfg.layer_decay_rate = 0.5
    return cfg, MODELS.build(cfg.model)


def test_layer_decay_factors_equal_the_formula(tiny):
    cfg, model = tiny
    lr, wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    groups = _groups(model, cfg.optim_wrapper)
    assert set(groups) == {n for n, _ in model.named_parameters()}
    # num_layers = depth + 1 = 5; scale = 0.5 ** (5 - layer_id), by hand
    expected = {
        "backbone.vit.pos_embed": (0.5 ** 5, wd),
        "backbone.vit.cls_token": (0.5 ** 5, wd),
        "backbone.vit.patch_embed.proj.weight": (0.5 ** 5, wd),
        "backbone.vit.patch_embed.proj.bias": (0.5 ** 5, 0.0),
        "backbone.vit.blocks.0.attn.qkv.weight": (0.5 ** 4, wd),
        "backbone.vit.blocks.0.rel_pos_bias.table": (0.5 ** 4, wd),
        "backbone.vit.blocks.2.mlp.fc2.weight": (0.5 ** 2, wd),
        "backbone.vit.blocks.3.ls2.gamma": (0.5, 0.0),
        "backbone.vit.blocks.3.norm1.weight": (0.5, 0.0),
        "neck.upsample_4x.0.weight": (1.0, wd),
        "decode_head.conv_seg.weight": (1.0, wd),
        "decode_head.conv_seg.bias": (1.0, 0.0),
        "auxiliary_head.conv_seg.weight": (1.0, wd),
    }
    for name, (scale, weight_decay) in expected.items():
        assert groups[name]["lr"] == pytest.approx(lr * scale), name
        assert groups[name]["weight_decay"] == pytest.approx(weight_decay), name


def test_same_groups_as_mmseg_for_its_own_mae(tiny):
    """Peer check: mmseg's LearningRateDecayOptimizerConstructor on mmseg's MAE segmentor gives every backbone
    parameter the lr and weight decay ours gives the parameter of the same (converted) name."""
    cfg, ours = tiny
    theirs_cfg = cfg.model.copy()
    theirs_cfg.backbone = dict(type="MAE", img_size=64, patch_size=16, embed_dims=64, num_layers=4, num_heads=4,
                               mlp_ratio=4, out_indices=[0, 1, 2, 3], init_values=1.0,
                               norm_cfg=dict(type="LN", eps=1e-6))
    theirs = MODELS.build(theirs_cfg)
    optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.05)
    mine = _groups(ours, dict(type="OptimWrapper", optimizer=optimizer, constructor="LayerDecayOptimWrapperConstructor",
                              paramwise_cfg=dict(layer_decay_rate=0.5, flat_decay_mult=0.0)))
    reference = dict(type="OptimWrapper", optimizer=optimizer, constructor="LearningRateDecayOptimizerConstructor",
                     paramwise_cfg=dict(num_layers=4, decay_rate=0.5, decay_type="layer_wise"))
    reference_optimizer = build_optim_wrapper(theirs, reference).optimizer
    to_canonical = FORMATS["mmseg"].to_canonical
    compared = 0
    for group in reference_optimizer.param_groups:
        for name in group["param_names"]:
            if name.startswith("backbone."):
                name = "backbone.vit." + next(iter(to_canonical({name[len("backbone."):]: None})))
            assert mine[name]["lr"] == pytest.approx(group["lr"]), name
            assert mine[name]["weight_decay"] == pytest.approx(group["weight_decay"]), name
            compared += 1
    assert compared == len(mine)


def test_custom_keys_lr_mult_is_multiplied_by_the_layer_decay_scale(tiny):
    # mmengine's paramwise options still apply, and the layer-decay scale multiplies the lr they give
    _, model = tiny
    lr = 1e-3
    groups = _groups(model, dict(type="OptimWrapper", constructor="LayerDecayOptimWrapperConstructor",
                                 optimizer=dict(type="AdamW", lr=lr, weight_decay=0.05),
                                 paramwise_cfg=dict(layer_decay_rate=0.5, custom_keys={
                                     "decode_head": dict(lr_mult=10.0), "backbone.vit.blocks.0.": dict(lr_mult=2.0)})))
    # depth 4: block 0 is layer 1, scale 0.5 ** (5 - 1); the heads are layer 5, scale 1
    assert groups["decode_head.conv_seg.weight"]["lr"] == pytest.approx(lr * 10.0)
    assert groups["backbone.vit.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(lr * 2.0 * 0.5 ** 4)
    assert groups["backbone.vit.blocks.1.attn.qkv.weight"]["lr"] == pytest.approx(lr * 0.5 ** 3)
    assert groups["auxiliary_head.conv_seg.weight"]["lr"] == pytest.approx(lr)
