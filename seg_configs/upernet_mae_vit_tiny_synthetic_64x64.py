# A tiny UperNet + MAE ViT-Tiny/16 on the built-in synthetic world, 64x64 crops: trains and evaluates on a laptop
# CPU in a few minutes (the tests and the demo use it). Not a benchmark: it shows the whole path learning; in the
# demo's 500 iterations (~3 min) it reaches mIoU ~47-53 on the 6 shapes (README).
#
#   python -m mae_transfer.data.synthetic --out data/world --size small
#   python tools/train_seg.py seg_configs/upernet_mae_vit_tiny_synthetic_64x64.py \
#       [--cfg-options model.pretrained=runs/demo/pretrain/encoder.safetensors]
#
# The same recipe as the ViT-B config (inherited: layer decay, heads, optimizer groups, logging), shrunk, on any
# dataset in ADE20K's layout (ADE20KLayoutDataset). Inference is on whole images at their own size, which ViTBackbone
# allows: a 96x96 world is trained on 64x64 crops and evaluated at 96x96.
_base_ = './upernet_mae_vit_base_ade20k_512x512_160k.py'

crop_size = (64, 64)
data_root = 'data/world/ade'
# mae_transfer.data.synthetic.CATEGORIES: label k + 1 in the annotations is class k (0 = background, ignored)
classes = ('disc', 'ring', 'square', 'triangle', 'star', 'cross')
num_classes = len(classes)

model = dict(
    pretrained=None,  # from scratch unless given; the ViT-B config names the released ViT-B encoder
    # Whole-image inference: test images are padded to a multiple of the patch size and the padding cut from the
    # prediction. Left to ViTBackbone, the padding would be unknown to the head, which would stretch the padded
    # grid's logits over the image. (The ViT-B/L configs' slide inference runs on 512 crops, as mmseg's.)
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size_divisor=16)),
    backbone=dict(arch='tiny', img_size=crop_size, drop_path_rate=0.0),
    neck=dict(embed_dim=192),
    decode_head=dict(in_channels=[192, 192, 192, 192], channels=64, num_classes=num_classes),
    auxiliary_head=dict(in_channels=192, channels=32, num_classes=num_classes),
    test_cfg=dict(_delete_=True, mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(type='ADE20KLayoutDataset', data_root=data_root, metainfo=dict(classes=classes))
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    dataset=dict(
        _delete_=True,
        **dataset,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 1000
warmup_iters = 50
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=500, max_keep_ckpts=1))
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
