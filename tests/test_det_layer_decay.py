"""Layer-wise lr decay of the ViTDet backbone: the formula decay ** (depth + 1 - layer_id) for chosen names,
detectron2's own get_vit_lr_decay_rate for every parameter, and the optimizer groups the configs build."""
from pathlib import Path

import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from mae_transfer.det import layer_decay_lr_factor

CONFIG = Path(__file__).resolve().parents[1] / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"


@pytest.fixture(scope="module")
def model():
    cfg = LazyConfig.load(str(CONFIG))
    return instantiate(cfg.model)  # ViT-Tiny, 12 blocks


# layer id: patch and position embeddings 0, block i is i + 1, everything after the ViT depth + 1 (factor 1).
@pytest.mark.parametrize("name, layer_id", [
    ("backbone.net.pos_embed", 0),
    ("backbone.net.patch_embed.proj.weight", 0),
    ("backbone.net.blocks.0.norm1.weight", 1),
    ("backbone.net.blocks.3.attn.rel_pos_h", 4),
    ("backbone.net.blocks.11.mlp.fc2.bias", 12),
    ("backbone.net.blocks.2.residual.conv1.weight", 13),  # ViTDet's optional residual blocks: not pretrained
    ("backbone.simfp_2.0.weight", 13),
    ("proposal_generator.rpn_head.conv.conv0.weight", 13),
    ("roi_heads.box_predictor.cls_score.weight", 13),
])
def test_factor_is_the_formula_and_detectron2s(name, layer_id):
    depth, decay = 12, 0.7
    factor = layer_decay_lr_factor(depth=depth, decay=decay)(name)
    assert factor == pytest.approx(decay ** (depth + 1 - layer_id), rel=1e-12)
    assert factor == pytest.approx(get_vit_lr_decay_rate(name, lr_decay_rate=decay, num_layers=depth), rel=1e-12)


def test_every_parameter_of_the_detector_decays_as_in_detectron2(model):
    factor = layer_decay_lr_factor(depth=12, decay=0.8)
    names = [name for name, _ in model.named_parameters()]
    assert len(names) > 200
    for name in names:
        assert factor(name) == pytest.approx(get_vit_lr_decay_rate(name, 0.8, 12), rel=1e-12), name


def test_optimizer_groups_decay_lr_by_layer_and_spare_norms_and_position_embedding(model):
    cfg = LazyConfig.load(str(CONFIG))
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    lr, wd, decay = cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.params.lr_factor_func.decay
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {  # name: (lr, weight decay)
        "backbone.net.pos_embed": (lr * decay ** 13, 0.0),
        "backbone.net.patch_embed.proj.weight": (lr * decay ** 13, wd),
        "backbone.net.blocks.0.norm1.weight": (lr * decay ** 12, 0.0),
        "backbone.net.blocks.5.attn.qkv.weight": (lr * decay ** 7, wd),
        "backbone.net.blocks.11.norm2.bias": (lr * decay, 0.0),
        # The channels-first LayerNorm of the pyramid and heads (detectron2.layers.LayerNorm) is no torch norm type
        # to get_default_optimizer_params: it decays, as in ViTDet's recipe that the reference APs come from.
        "backbone.simfp_5.1.norm.weight": (lr, wd),
        "roi_heads.box_head.fc1.weight": (lr, wd),
    }
    for name, (want_lr, want_wd) in expected.items():
        group = group_of[id(params[name])]
        assert (group["lr"], group["weight_decay"]) == (pytest.approx(want_lr, rel=1e-9), want_wd), name
