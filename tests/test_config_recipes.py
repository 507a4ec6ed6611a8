"""The full-size detection and segmentation configs, and the classification presets, against the published recipes
(/work/shared/notes/reference.md).

Each config is loaded with its host's own loader (detectron2's LazyConfig.load, mmengine's Config.fromfile) and no
model is built: the layer-decay and weight-decay rules run through the config's own optimizer logic on a stand-in
module that has the real models' parameter names and module types (tests/test_det_layer_decay.py and
tests/test_seg_layer_decay.py check those names against the real models) and a few elements per tensor.

Expected values are written from reference.md's numbers, each with the line it comes from ("ref L40"), and derived
values (a 75-epoch schedule, the layer-decay factors) are computed here from them, never read from the configs.
"""
import inspect
from functools import lru_cache

import pytest
import torch
from torch import nn

from convert_helpers import ROOT, load_tool

DET_DIR = ROOT / "det_configs"
SEG_DIR = ROOT / "seg_configs"

# ref L15: ViT-B/16 (768 dim, 12 blocks, 12 heads), ViT-L/16 (1024, 24, 16), ViT-H/14 (1280, 32, 16); mlp ratio 4.
VIT = {
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
MLP_RATIO = 4
IMAGENET_RGB_MEAN = [123.675, 116.28, 103.53]  # ref L39
IMAGENET_RGB_STD = [58.395, 57.12, 57.375]  # ref L39


def expected_layer_id(name: str, depth: int) -> int:
    """ref L21 (the MAE layer-decay rule): cls/pos/patch-embed are layer 0, block i is layer i + 1, the rest
    num_layers = depth + 1."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if {"cls_token", "pos_embed", "patch_embed"} & set(parts):
        return 0
    return depth + 1


def expected_lr_scale(name: str, depth: int, decay: float) -> float:
    """ref L21: scale = decay ** (num_layers - layer_id), num_layers = depth + 1."""
    return decay ** (depth + 1 - expected_layer_id(name, depth))


def stand_in(tree: dict) -> nn.Module:
    """An nn.Module tree from a nested dict whose leaves are modules or parameters: the names, module types and
    parameter ranks of a real model, with no real weights."""
    module = nn.Module()
    for key, value in tree.items():
        if isinstance(value, dict):
            value = stand_in(value)
        if isinstance(value, nn.Parameter):
            module.register_parameter(key, value)
        else:
            module.add_module(key, value)
    return module


def _p(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


# --------------------------------------------------------------------------------------------------------------------
# Detection: ViTDet Mask R-CNN (ref L36-L41)
# --------------------------------------------------------------------------------------------------------------------
# ref L37 (B, L); ViT-H's, which reference.md leaves out, are ViTDet's: the last block of each quarter of 32.
GLOBAL_BLOCKS = {"base": [2, 5, 8, 11], "large": [5, 11, 17, 23], "huge": [7, 15, 23, 31]}
DET_DROP_PATH = {"base": 0.1, "large": 0.4, "huge": 0.5}  # ref L37
DET_LAYER_DECAY = {"base": 0.7, "large": 0.8, "huge": 0.9}  # ref L40
DET_IMAGE_SIZE = 1024  # ref L37, L40
WINDOW_SIZE = 14  # ref L37
PRETRAIN_IMG_SIZE = 224  # ref L37: absolute pos embed kept at the pretraining size, with cls
# ref L40: 100 epochs = 184,375 iterations at batch 64; warmup 250 iterations; steps at 163,889 and 177,546.
ITERS_PER_100_EPOCHS = 184_375
STEPS_OF_100_EPOCHS = (163_889, 177_546)
DET_WARMUP_ITERS = 250
DET_BATCH = 64
DET_LR, DET_WEIGHT_DECAY = 1e-4, 0.1  # ref L40
STEP_FACTOR = 0.1  # ref L40 says "steps": detectron2's multi-step schedule divides the lr by 10 at each

# Every full-size config in det_configs/ (file, ViT size, epochs): test_every_full_size_config_is_checked keeps it so.
DET_CONFIGS = [
    ("mask_rcnn_vit_base_100ep.py", "base", 100),
    ("mask_rcnn_vit_large_100ep.py", "large", 100),
    ("mask_rcnn_vit_huge_100ep.py", "huge", 100),
    ("mask_rcnn_vit_huge_75ep.py", "huge", 75),
]
DET_SMALL = {"mask_rcnn_vit_tiny_synthetic.py"}  # not a recipe (its docstring): tests/test_det_*.py cover it
det_params = pytest.mark.parametrize("config, size, epochs", DET_CONFIGS, ids=[c[:-3] for c, _, _ in DET_CONFIGS])


@pytest.fixture(scope="module")
def d2():
    return pytest.importorskip("detectron2.config")


@lru_cache(maxsize=None)
def _det_config_cached(config: str):
    from detectron2.config import LazyConfig
    return LazyConfig.load(str(DET_DIR / config))


@pytest.fixture
def det_cfg(d2, config):
    """The loaded config, shared read-only between tests (loading is the slow part)."""
    return _det_config_cached(config)


def _arg(node, name):
    """A LazyCall argument as the config gives it, else its default in the class it calls (or, through **kwargs,
    in the first base class that names it)."""
    if name in node:
        return node[name]
    for cls in inspect.getmro(node._target_):
        parameter = inspect.signature(cls.__init__).parameters.get(name)
        if parameter is not None:
            return parameter.default
    raise KeyError(f"{node._target_.__name__} takes no argument {name!r}")


def _target_name(node) -> str:
    return node._target_.__name__


@det_params
def test_det_backbone_is_the_vitdet_recipe(det_cfg, config, size, epochs):
    net = det_cfg.model.backbone.net
    for key, want in VIT[size].items():
        assert net[key] == want, f"{config}: backbone {key} {net[key]}, recipe {want} (ref L15)"
    assert net.mlp_ratio == MLP_RATIO, f"{config}: mlp_ratio {net.mlp_ratio} (ref L15)"
    assert _arg(net, "qkv_bias") is True, f"{config}: qkv bias off"
    # ViT-H/14 too: its patch embedding is resampled to 16 for detection (ref L34)
    assert net.patch_size == 16, f"{config}: patch size {net.patch_size}, ViTDet uses 16 for every size (ref L34)"
    assert net.img_size == DET_IMAGE_SIZE, f"{config}: img_size {net.img_size}, recipe {DET_IMAGE_SIZE} (ref L37)"
    assert net.window_size == WINDOW_SIZE, f"{config}: window {net.window_size}, recipe {WINDOW_SIZE} (ref L37)"
    depth = VIT[size]["depth"]
    global_blocks = [i for i in range(depth) if i not in set(net.window_block_indexes)]
    assert global_blocks == GLOBAL_BLOCKS[size], (
        f"{config}: global-attention blocks {global_blocks}, recipe {GLOBAL_BLOCKS[size]} (ref L37)")
    assert sorted(net.window_block_indexes) == [i for i in range(depth) if i not in GLOBAL_BLOCKS[size]], (
        f"{config}: window_block_indexes {list(net.window_block_indexes)} name blocks outside 0..{depth - 1}")
    assert list(_arg(net, "residual_block_indexes")) == [], f"{config}: ViTDet adds no residual conv blocks"
    assert _arg(net, "use_rel_pos") is True and _arg(net, "rel_pos_zero_init") is True, (
        f"{config}: decomposed relative positions, zero-initialised (ref L37)")
    assert _arg(net, "use_abs_pos") is True and _arg(net, "pretrain_use_cls_token") is True, (
        f"{config}: absolute position embedding with the cls row, as pretrained (ref L37)")
    assert _arg(net, "pretrain_img_size") == PRETRAIN_IMG_SIZE, (
        f"{config}: pretrain_img_size {_arg(net, 'pretrain_img_size')}, recipe {PRETRAIN_IMG_SIZE} (ref L37)")
    assert net.drop_path_rate == pytest.approx(DET_DROP_PATH[size]), (
        f"{config}: drop path {net.drop_path_rate}, recipe {DET_DROP_PATH[size]} (ref L37)")
    assert det_cfg.train.init_checkpoint.endswith(f"mae_pretrain_vit_{size}.pth"), (
        f"{config}: init_checkpoint {det_cfg.train.init_checkpoint!r} is not the MAE ViT-{size} release (ref L28)")


@det_params
def test_det_pyramid_heads_and_pixels_are_the_vitdet_recipe(det_cfg, config, size, epochs):
    model = det_cfg.model
    backbone = model.backbone
    assert _target_name(backbone) == "SimpleFeaturePyramid", f"{config}: backbone {_target_name(backbone)}"
    assert tuple(backbone.scale_factors) == (4.0, 2.0, 1.0, 0.5), (
        f"{config}: pyramid scales {tuple(backbone.scale_factors)}, recipe 4, 2, 1, 0.5 (ref L38)")
    assert backbone.out_channels == 256 and backbone.norm == "LN", f"{config}: pyramid 256 channels + LN (ref L38)"
    assert _target_name(backbone.top_block) == "LastLevelMaxPool", f"{config}: p6 by max pool (ref L38)"
    assert backbone.square_pad == DET_IMAGE_SIZE, (
        f"{config}: square_pad {backbone.square_pad}, recipe {DET_IMAGE_SIZE} (ref L38)")
    assert list(model.proposal_generator.head.conv_dims) == [-1, -1], f"{config}: RPN is not 2-conv (ref L39)"
    box_head = model.roi_heads.box_head
    assert len(box_head.conv_dims) == 4 and len(box_head.fc_dims) == 1, (
        f"{config}: box head {len(box_head.conv_dims)}conv{len(box_head.fc_dims)}fc, recipe 4conv1fc (ref L39)")
    assert box_head.conv_norm == "LN" and model.roi_heads.mask_head.conv_norm == "LN", (
        f"{config}: conv heads without LN (ref L39)")
    assert model.input_format == "RGB", f"{config}: input format {model.input_format} (ref L39)"
    assert list(model.pixel_mean) == pytest.approx(IMAGENET_RGB_MEAN), (
        f"{config}: pixel_mean {list(model.pixel_mean)}, recipe {IMAGENET_RGB_MEAN} (ref L39)")
    assert list(model.pixel_std) == pytest.approx(IMAGENET_RGB_STD), (
        f"{config}: pixel_std {list(model.pixel_std)}, recipe {IMAGENET_RGB_STD} (ref L39)")


@det_params
def test_det_data_is_large_scale_jitter_at_batch_64(det_cfg, config, size, epochs):
    train = det_cfg.dataloader.train
    assert train.total_batch_size == DET_BATCH, (
        f"{config}: batch {train.total_batch_size}, recipe {DET_BATCH} (ref L40)")
    assert train.mapper.image_format == "RGB", f"{config}: mapper reads {train.mapper.image_format} (ref L39)"
    augs = train.mapper.augmentations
    assert [_target_name(a) for a in augs] == ["RandomFlip", "ResizeScale", "FixedSizeCrop"], (
        f"{config}: train augmentations {[_target_name(a) for a in augs]}, recipe flip, ResizeScale, "
        f"FixedSizeCrop (ref L40)")
    flip, resize, crop = augs
    assert _arg(flip, "horizontal") is True and _arg(flip, "vertical") is False, f"{config}: flip not horizontal"
    assert (resize.min_scale, resize.max_scale) == (0.1, 2.0), (
        f"{config}: jitter scales {resize.min_scale}-{resize.max_scale}, recipe 0.1-2.0 (ref L40)")
    assert (resize.target_height, resize.target_width) == (DET_IMAGE_SIZE, DET_IMAGE_SIZE), (
        f"{config}: jitter of {resize.target_height}x{resize.target_width}, recipe {DET_IMAGE_SIZE} (ref L40)")
    assert tuple(crop.crop_size) == (DET_IMAGE_SIZE, DET_IMAGE_SIZE), (
        f"{config}: crop {tuple(crop.crop_size)}, recipe {DET_IMAGE_SIZE} (ref L40)")
    test_augs = det_cfg.dataloader.test.mapper.augmentations
    assert [(_target_name(a), a.short_edge_length, a.max_size) for a in test_augs] == [
        ("ResizeShortestEdge", DET_IMAGE_SIZE, DET_IMAGE_SIZE)], f"{config}: test images not at 1024 (ref L37)"


@det_params
def test_det_schedule_is_the_vitdet_recipe(d2, det_cfg, config, size, epochs):
    # ref L40, scaled to the config's epochs: the iterations of `epochs` epochs, the steps at the same fractions.
    max_iter = ITERS_PER_100_EPOCHS * epochs / 100
    steps = [s / ITERS_PER_100_EPOCHS * max_iter for s in STEPS_OF_100_EPOCHS]
    got_max_iter = det_cfg.train.max_iter
    assert abs(got_max_iter - max_iter) < 1, (
        f"{config}: max_iter {got_max_iter}, recipe {max_iter:g} ({epochs} epochs at {ITERS_PER_100_EPOCHS} per 100, "
        f"ref L40)")
    schedule = det_cfg.lr_multiplier
    milestones = list(schedule.scheduler.milestones)
    assert len(milestones) == 2 and all(abs(m - s) <= 1 for m, s in zip(milestones, steps)), (
        f"{config}: lr steps at {milestones}, recipe {[round(s, 1) for s in steps]} (ref L40)")
    assert schedule.scheduler.num_updates == got_max_iter, (
        f"{config}: step schedule over {schedule.scheduler.num_updates} iterations, training runs {got_max_iter}")
    assert det_cfg.train.amp.enabled is True, f"{config}: AMP off (ref L40)"

    # The multiplier as detectron2's LRMultiplier evaluates it: at iteration i, where = i / max_iter.
    multiplier = d2.instantiate(schedule)
    at = lambda i: multiplier(i / got_max_iter)  # noqa: E731
    for i, want in [(DET_WARMUP_ITERS, 1.0), (milestones[0] - 1, 1.0), (milestones[0], STEP_FACTOR),
                    (milestones[1] - 1, STEP_FACTOR), (milestones[1], STEP_FACTOR ** 2),
                    (got_max_iter - 1, STEP_FACTOR ** 2)]:
        assert at(i) == pytest.approx(want), f"{config}: lr multiplier {at(i):g} at iteration {i}, recipe {want:g}"
    # ViTDet's 75-epoch config scales max_iter but keeps warmup_length, a fraction: its warmup shrinks by 3/4 too.
    want_warmup = DET_WARMUP_ITERS * epochs / 100
    warmup_iters = schedule.warmup_length * got_max_iter
    assert warmup_iters == pytest.approx(want_warmup, abs=0.5), (
        f"{config}: linear warmup over {warmup_iters:g} iterations (warmup_length {schedule.warmup_length:.6g} of "
        f"{got_max_iter}), recipe {want_warmup:g} (ref L40, scaled as ViTDet's 75-epoch config does)")
    assert at(0) < at(want_warmup // 2) < 1.0, f"{config}: lr does not ramp up during warmup"


def _vitdet_stand_in(depth: int) -> nn.Module:
    """detectron2's ViTDet Mask R-CNN parameter names and module types (nn.LayerNorm in the ViT blocks), tiny."""
    block = lambda: dict(  # noqa: E731
        norm1=nn.LayerNorm(2),
        attn=dict(qkv=nn.Linear(2, 6), proj=nn.Linear(2, 2), rel_pos_h=_p(3, 1), rel_pos_w=_p(3, 1)),
        norm2=nn.LayerNorm(2),
        mlp=dict(fc1=nn.Linear(2, 8), fc2=nn.Linear(8, 2)))
    return stand_in(dict(
        backbone=dict(
            net=dict(pos_embed=_p(1, 5, 2), patch_embed=dict(proj=nn.Conv2d(3, 2, 1)),
                     blocks={str(i): block() for i in range(depth)}),
            simfp_2={"0": nn.ConvTranspose2d(2, 1, 2)},
            simfp_5={"1": nn.Conv2d(2, 2, 1)}),
        proposal_generator=dict(rpn_head=dict(conv=dict(conv0=nn.Conv2d(2, 2, 3)))),
        roi_heads=dict(box_head=dict(fc1=nn.Linear(2, 2)), box_predictor=dict(cls_score=nn.Linear(2, 81)))))


@det_params
def test_det_optimizer_is_adamw_with_the_recipes_layer_decay(d2, det_cfg, config, size, epochs):
    optimizer = det_cfg.optimizer
    assert optimizer._target_ is torch.optim.AdamW, f"{config}: optimizer {optimizer._target_} (ref L40)"
    assert optimizer.lr == pytest.approx(DET_LR), f"{config}: lr {optimizer.lr}, recipe {DET_LR} (ref L40)"
    assert optimizer.weight_decay == pytest.approx(DET_WEIGHT_DECAY), (
        f"{config}: weight decay {optimizer.weight_decay}, recipe {DET_WEIGHT_DECAY} (ref L40)")
    depth, decay = VIT[size]["depth"], DET_LAYER_DECAY[size]
    factor = d2.instantiate(optimizer.params.lr_factor_func)  # the config's own rule, its depth resolved
    names = ["backbone.net.pos_embed", "backbone.net.patch_embed.proj.weight", "backbone.net.blocks.0.norm1.weight",
             f"backbone.net.blocks.{depth // 2}.attn.rel_pos_h", f"backbone.net.blocks.{depth - 1}.mlp.fc2.bias",
             "backbone.simfp_2.0.weight", "roi_heads.box_predictor.cls_score.weight"]
    for name in names:
        want = expected_lr_scale(name, depth, decay)
        assert factor(name) == pytest.approx(want, rel=1e-12), (
            f"{config}: lr factor of {name} {factor(name):.6g}, recipe {decay} ** ({depth} + 1 - "
            f"{expected_layer_id(name, depth)}) = {want:.6g} (ref L21, L40)")


@det_params
def test_det_param_groups_decay_by_layer_and_spare_norms_and_pos_embed(d2, config, size, epochs):
    """The optimizer the config instantiates, on every parameter name of the ViTDet backbone: lr 1e-4 x the layer
    factor; weight decay 0.1 except on the backbone's norms and pos_embed (ref L40; ViT-H: on all, as ViTDet's).
    (The pyramid's and heads' channels-first LN, no torch norm type, decays in ViTDet: test_det_layer_decay.py.)"""
    cfg = d2.LazyConfig.load(str(DET_DIR / config))  # a fresh copy: the model goes into it
    depth, decay = VIT[size]["depth"], DET_LAYER_DECAY[size]
    model = _vitdet_stand_in(depth)
    cfg.optimizer.params.model = model
    optimizer = d2.instantiate(cfg.optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    norms = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
             for p in ("weight", "bias")}
    wrong = []
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        want_lr = DET_LR * expected_lr_scale(name, depth, decay)
        # ViTDet's ViT-H configs (detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_h_*.py) decay everything
        spared = size != "huge" and (name in norms or name.endswith("pos_embed"))
        want_wd = 0.0 if spared else DET_WEIGHT_DECAY
        if group["lr"] != pytest.approx(want_lr, rel=1e-9) or group["weight_decay"] != want_wd:
            wrong.append(f"{name}: lr {group['lr']:.6g} wd {group['weight_decay']:g}, "
                         f"recipe lr {want_lr:.6g} wd {want_wd:g}")
    assert not wrong, (f"{config}: {len(wrong)} parameters off the recipe (ref L40: weight decay 0.1, none on norms "
                       f"and pos_embed; layer decay {decay}), e.g.\n  " + "\n  ".join(wrong[:6]))


def test_every_full_size_det_config_is_checked():
    configs = {p.name for p in DET_DIR.glob("*.py")} - DET_SMALL
    assert configs == {c for c, _, _ in DET_CONFIGS}, "det_configs/ changed: add new recipes to DET_CONFIGS"


# --------------------------------------------------------------------------------------------------------------------
# Segmentation: UperNet on ADE20K in mmsegmentation (ref L44-L50)
# --------------------------------------------------------------------------------------------------------------------
SEG_OUT_INDICES_BASE = [3, 5, 7, 11]  # ref L45 (ViT-B; reference.md gives no ViT-L ones)
SEG_HEAD_CHANNELS_BASE = 768  # ref L46
SEG_NUM_CLASSES = 150  # ref L46
SEG_AUX_LEVEL, SEG_AUX_WEIGHT = 2, 0.4  # ref L46
SEG_CROP = (512, 512)  # ref L47
SEG_SLIDE_STRIDE = (341, 341)  # ref L47
SEG_MAX_ITERS, SEG_WARMUP_ITERS, SEG_BATCH = 160_000, 1500, 16  # ref L47
SEG_LR, SEG_WEIGHT_DECAY = 1e-4, 0.05  # ref L47
# ref L47 gives ViT-B's 0.65 (= the MAE ViT-B fine-tuning decay, ref L20); for ViT-L, the MAE ViT-L fine-tuning
# decay of ref L20, which the ViT-L config says it takes.
SEG_LAYER_DECAY = {"base": 0.65, "large": 0.75}
SEG_GPUS = 8  # the recipe's batch 16 is 8 GPUs x train_dataloader.batch_size (mmseg's "8xb2" MAE config)

SEG_CONFIGS = [
    ("upernet_mae_vit_base_ade20k_512x512_160k.py", "base"),
    ("upernet_mae_vit_large_ade20k_512x512_160k.py", "large"),
]
SEG_SMALL = {"upernet_mae_vit_tiny_synthetic_64x64.py"}  # the CPU demo: tests/test_seg_*.py cover it
seg_params = pytest.mark.parametrize("config, size", SEG_CONFIGS, ids=[c.split("_ade20k")[0] for c, _ in SEG_CONFIGS])


@pytest.fixture(scope="module")
def mm():
    pytest.importorskip("mmseg")
    from mmengine.registry import init_default_scope

    import mae_transfer.seg  # noqa: F401  (registers ViTBackbone and LayerDecayOptimWrapperConstructor)
    init_default_scope("mmseg")
    import mmengine.optim
    return mmengine


@lru_cache(maxsize=None)
def _seg_config_cached(config: str):
    from mmengine.config import Config
    return Config.fromfile(str(SEG_DIR / config))


@pytest.fixture
def seg_cfg(mm, config):
    return _seg_config_cached(config)


@seg_params
def test_seg_model_is_the_mae_upernet_recipe(seg_cfg, config, size):
    from mae_transfer.models import ARCHS
    model = seg_cfg.model
    backbone = model.backbone
    assert backbone.type == "ViTBackbone", f"{config}: backbone {backbone.type}"
    arch = ARCHS[backbone.arch]
    for key, want in VIT[size].items():
        assert arch[key] == want, f"{config}: arch {backbone.arch!r} has {key} {arch[key]}, recipe {want} (ref L15)"
    width, depth = VIT[size]["embed_dim"], VIT[size]["depth"]
    assert backbone.patch_size == 16, f"{config}: patch size {backbone.patch_size}"
    assert tuple(backbone.img_size if isinstance(backbone.img_size, (tuple, list)) else
                 (backbone.img_size,) * 2) == SEG_CROP, f"{config}: img_size {backbone.img_size}, crops {SEG_CROP}"
    assert backbone.init_values == 1.0, f"{config}: layer scale init {backbone.init_values}, recipe 1.0 (ref L45)"
    out = list(backbone.out_indices)
    if size == "base":
        assert out == SEG_OUT_INDICES_BASE, f"{config}: out_indices {out}, recipe {SEG_OUT_INDICES_BASE} (ref L45)"
    else:  # no published numbers: four increasing blocks, the last one the last block
        assert len(out) == 4 and out == sorted(set(out)) and 0 <= out[0] and out[-1] == depth - 1, (
            f"{config}: out_indices {out} are not four increasing blocks ending with block {depth - 1}")

    assert model.neck.type == "Feature2Pyramid" and model.neck.embed_dim == width, (
        f"{config}: neck {model.neck.type} of width {model.neck.embed_dim}, recipe Feature2Pyramid({width}) (ref L46)")
    assert list(model.neck.rescales) == [4, 2, 1, 0.5], f"{config}: neck rescales {model.neck.rescales} (ref L46)"
    head, aux = model.decode_head, model.auxiliary_head
    assert head.type == "UPerHead" and list(head.in_channels) == [width] * 4, (
        f"{config}: decode head {head.type} on {list(head.in_channels)}, recipe UPerHead on [{width}]*4 (ref L46)")
    if size == "base":
        assert head.channels == SEG_HEAD_CHANNELS_BASE, (
            f"{config}: UPerHead channels {head.channels}, recipe {SEG_HEAD_CHANNELS_BASE} (ref L46)")
    assert (head.num_classes, aux.num_classes) == (SEG_NUM_CLASSES, SEG_NUM_CLASSES), (
        f"{config}: classes {head.num_classes} / auxiliary {aux.num_classes}, recipe {SEG_NUM_CLASSES} (ref L46)")
    assert aux.type == "FCNHead" and aux.in_channels == width and aux.in_index == SEG_AUX_LEVEL, (
        f"{config}: auxiliary {aux.type} on level {aux.in_index} ({aux.in_channels} channels), recipe FCNHead on "
        f"level {SEG_AUX_LEVEL} (ref L46)")
    assert aux.loss_decode.loss_weight == SEG_AUX_WEIGHT, (
        f"{config}: auxiliary loss weight {aux.loss_decode.loss_weight}, recipe {SEG_AUX_WEIGHT} (ref L46)")
    assert head.loss_decode.loss_weight == 1.0, f"{config}: decode loss weight {head.loss_decode.loss_weight}"


@seg_params
def test_seg_data_and_inference_are_the_recipe(seg_cfg, config, size):
    loader = seg_cfg.train_dataloader
    assert loader.batch_size * SEG_GPUS == SEG_BATCH, (
        f"{config}: {loader.batch_size} images per GPU x {SEG_GPUS} GPUs, recipe batch {SEG_BATCH} (ref L47)")
    crops = [t for t in loader.dataset.pipeline if t.type == "RandomCrop"]
    assert len(crops) == 1 and tuple(crops[0].crop_size) == SEG_CROP, (
        f"{config}: train crops {[tuple(t.crop_size) for t in crops]}, recipe {SEG_CROP} (ref L47)")
    assert tuple(seg_cfg.model.data_preprocessor.size) == SEG_CROP, (
        f"{config}: batches padded to {seg_cfg.model.data_preprocessor.size}, recipe crops {SEG_CROP}")
    test_cfg = seg_cfg.model.test_cfg
    assert (test_cfg.mode, tuple(test_cfg.crop_size), tuple(test_cfg.stride)) == ("slide", SEG_CROP,
                                                                                   SEG_SLIDE_STRIDE), (
        f"{config}: inference {test_cfg.mode} crop {test_cfg.get('crop_size')} stride {test_cfg.get('stride')}, "
        f"recipe slide crop {SEG_CROP} stride {SEG_SLIDE_STRIDE} (ref L47)")
    # The MAE encoder's ImageNet statistics, on RGB: the values ref L39 lists
    pre = seg_cfg.model.data_preprocessor
    assert pre.bgr_to_rgb is True, f"{config}: images not converted to RGB"
    assert list(pre.mean) == pytest.approx(IMAGENET_RGB_MEAN) and list(pre.std) == pytest.approx(IMAGENET_RGB_STD), (
        f"{config}: pixel mean {list(pre.mean)} std {list(pre.std)}, recipe {IMAGENET_RGB_MEAN} {IMAGENET_RGB_STD}")


@seg_params
def test_seg_schedule_is_warmup_then_poly_over_160k(seg_cfg, config, size):
    assert seg_cfg.train_cfg.type == "IterBasedTrainLoop" and seg_cfg.train_cfg.max_iters == SEG_MAX_ITERS, (
        f"{config}: {seg_cfg.train_cfg.type} of {seg_cfg.train_cfg.max_iters} iterations, recipe {SEG_MAX_ITERS} "
        f"(ref L47)")
    schedulers = seg_cfg.param_scheduler
    assert [s.type for s in schedulers] == ["LinearLR", "PolyLR"], (
        f"{config}: schedulers {[s.type for s in schedulers]}, recipe linear warmup then poly (ref L47)")
    warmup, poly = schedulers
    assert (warmup.begin, warmup.end) == (0, SEG_WARMUP_ITERS) and warmup.start_factor < 1e-3, (
        f"{config}: warmup from {warmup.start_factor:g} x lr over {warmup.begin}..{warmup.end}, recipe 0.."
        f"{SEG_WARMUP_ITERS} from ~0 (ref L47)")
    assert (poly.begin, poly.end) == (SEG_WARMUP_ITERS, SEG_MAX_ITERS), (
        f"{config}: poly decay over {poly.begin}..{poly.end}, recipe {SEG_WARMUP_ITERS}..{SEG_MAX_ITERS} (ref L47)")
    assert poly.power == 1.0 and poly.eta_min == 0.0, (
        f"{config}: poly power {poly.power} to {poly.eta_min}, mmseg's MAE recipe: power 1 to 0")
    assert not warmup.by_epoch and not poly.by_epoch, f"{config}: schedule by epoch in an iteration-based loop"


def _seg_stand_in(depth: int) -> nn.Module:
    """ViTBackbone segmentor parameter names and module types (timm names under backbone.vit), tiny; the layer-decay
    constructor reads the depth from backbone.depth."""
    block = lambda: dict(  # noqa: E731
        norm1=nn.LayerNorm(2),
        attn=dict(qkv=nn.Linear(2, 6), proj=nn.Linear(2, 2)),
        rel_pos_bias=dict(table=_p(5, 1)),
        ls1=dict(gamma=_p(2)),
        norm2=nn.LayerNorm(2),
        mlp=dict(fc1=nn.Linear(2, 8), fc2=nn.Linear(8, 2)),
        ls2=dict(gamma=_p(2)))
    model = stand_in(dict(
        backbone=dict(vit=dict(cls_token=_p(1, 1, 2), pos_embed=_p(1, 5, 2), patch_embed=dict(proj=nn.Conv2d(3, 2, 1)),
                               blocks={str(i): block() for i in range(depth)})),
        neck=dict(upsample_4x={"0": nn.ConvTranspose2d(2, 2, 2)}),
        decode_head=dict(conv_seg=nn.Conv2d(2, 150, 1)),
        auxiliary_head=dict(conv_seg=nn.Conv2d(2, 150, 1))))
    model.backbone.depth = depth
    return model


@seg_params
def test_seg_optimizer_is_adamw_with_the_recipes_layer_decay(mm, seg_cfg, config, size):
    wrapper = seg_cfg.optim_wrapper
    opt = wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay) == ("AdamW", SEG_LR, SEG_WEIGHT_DECAY), (
        f"{config}: {opt.type} lr {opt.lr} weight decay {opt.weight_decay}, recipe AdamW lr {SEG_LR} weight decay "
        f"{SEG_WEIGHT_DECAY} (ref L47)")
    decay = SEG_LAYER_DECAY[size]
    assert wrapper.paramwise_cfg.layer_decay_rate == decay, (
        f"{config}: layer decay {wrapper.paramwise_cfg.layer_decay_rate}, recipe {decay} (ref L47, L20)")

    depth = VIT[size]["depth"]
    model = _seg_stand_in(depth)
    optimizer = mm.optim.build_optim_wrapper(model, seg_cfg.optim_wrapper.copy()).optimizer
    assert isinstance(optimizer, torch.optim.AdamW), f"{config}: built {type(optimizer).__name__}"
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    wrong = []
    for name, param in model.named_parameters():
        group = group_of[id(param)]
        want_lr = SEG_LR * expected_lr_scale(name, depth, decay)
        # weight decay on matrices; none on 1-D parameters (biases, norms, layer scale), as mmseg's MAE groups
        want_wd = SEG_WEIGHT_DECAY if param.ndim > 1 else 0.0
        if group["lr"] != pytest.approx(want_lr, rel=1e-9) or group["weight_decay"] != pytest.approx(want_wd):
            wrong.append(f"{name}: lr {group['lr']:.6g} wd {group['weight_decay']:g}, "
                         f"recipe lr {want_lr:.6g} wd {want_wd:g}")
    assert not wrong, (f"{config}: {len(wrong)} parameters off the recipe (ref L47: lr {SEG_LR}, layer decay "
                       f"{decay} ** ({depth} + 1 - layer id)), e.g.\n  " + "\n  ".join(wrong[:6]))


def test_every_full_size_seg_config_is_checked():
    configs = {p.name for p in SEG_DIR.glob("*.py")} - SEG_SMALL
    assert configs == {c for c, _ in SEG_CONFIGS}, "seg_configs/ changed: add new recipes to SEG_CONFIGS"


# ----------------------------------------------------------------------------------------------- classification

# ref L20: fine-tuning B / L / H; ref L23: linear probing; ref L24: partial fine-tuning uses the fine-tuning recipe.
FINETUNE = dict(mode="finetune", effective_batch_size=1024, weight_decay=0.05, warmup_epochs=5, min_lr=1e-6,
                mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1", reprob=0.25, global_pool=True)
FINETUNE_SIZE = {"base": dict(model="vit_base_patch16", drop_path=0.1, layer_decay=0.65, blr=5e-4, epochs=100),
                 "large": dict(model="vit_large_patch16", drop_path=0.2, layer_decay=0.75, blr=1e-3, epochs=50),
                 "huge": dict(model="vit_huge_patch14", drop_path=0.3, layer_decay=0.75, blr=1e-3, epochs=50)}
LINPROBE = dict(mode="linprobe", blr=0.1, weight_decay=0.0, effective_batch_size=16384, epochs=90, warmup_epochs=10,
                global_pool=False, mixup=0.0, cutmix=0.0)
CLS_PRESETS = {
    "finetune-base": dict(FINETUNE, **FINETUNE_SIZE["base"], input_size=224),
    "finetune-large": dict(FINETUNE, **FINETUNE_SIZE["large"], input_size=224),
    "finetune-huge": dict(FINETUNE, **FINETUNE_SIZE["huge"], input_size=224),
    "finetune-huge-448": dict(FINETUNE, **FINETUNE_SIZE["huge"], input_size=448),  # ref L20: 87.8 at 448
    "linprobe-base": dict(LINPROBE, model="vit_base_patch16"),
    "linprobe-large": dict(LINPROBE, model="vit_large_patch16"),
    "linprobe-huge": dict(LINPROBE, model="vit_huge_patch14"),
    # ref L24: ViT-L, the last block tuned; the paper picks its epochs per K (here 100 for K = 1)
    "partial-large": dict(FINETUNE, **dict(FINETUNE_SIZE["large"], epochs=100), mode="partial", partial_blocks=1),
}


@pytest.mark.parametrize("preset", sorted(CLS_PRESETS))
def test_classification_presets_are_the_published_recipes(preset):
    args = load_tool("train_cls").parse_args(["--preset", preset])
    got = {key: getattr(args, key) for key in CLS_PRESETS[preset]}
    assert got == CLS_PRESETS[preset]


def test_every_full_size_classification_preset_is_checked():
    presets = {name for name in load_tool("train_cls").PRESETS if not name.startswith("tiny")}
    assert presets == set(CLS_PRESETS), "cls presets changed: add new recipes to CLS_PRESETS"
