"""Mask R-CNN, ViT-B/16 MAE backbone, ViTDet's 100-epoch COCO recipe (detectron2 projects/ViTDet).

Expected on COCO val2017 (ViTDet, MAE IN1K ViT-B): box AP 51.6, mask AP 45.9.
Batch 64, as ViTDet trained it: one 1024 px image per GPU on 64 GPUs, 10.9 GB per GPU with AMP
(model.backbone.net.use_act_checkpoint=True lowers that at ~25% more time).
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from mae_transfer.det import ViT, layer_decay_lr_factor, vitdet_arch

from .common.coco_loader_lsj import dataloader

# detectron2's ViTDet Mask R-CNN (SimpleFeaturePyramid p2-p6, 2-conv RPN, 4conv1fc box head, LN in the heads),
# with our ViT class: detectron2's, plus fused attention and torch activation checkpointing.
model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model.backbone.net._target_ = ViT
model.backbone.net.update(vitdet_arch("base"), drop_path_rate=0.1, use_act_checkpoint=False)

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
# The MAE release; any checkpoint mae_transfer reads works (reference, timm, ours), loaded by exact names.
train.init_checkpoint = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth"

# 100 epochs = 184375 iterations x 64 images / 118k images
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# AdamW lr 1e-4, weight decay 0.1, none on norms (weight_decay_norm=0) and the position embedding;
# layer-wise lr decay 0.7 over the backbone's blocks.
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = L(layer_decay_lr_factor)(depth="${model.backbone.net.depth}", decay=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
