"""Mask R-CNN, ViT-H MAE backbone at patch 16, ViTDet's 100-epoch COCO recipe.

Expected on COCO val2017: box AP >= 56.7, mask AP >= 50.2 (ViTDet's MAE IN1K ViT-H, trained 75 epochs:
mask_rcnn_vit_huge_75ep.py reproduces that schedule).
The MAE ViT-H is pretrained with 14 px patches: the loader interpolates its patch embedding to 16 bicubically (as
ViTDet made its "p14to16" weights) and resizes its position embedding, and says so in the log.
ViTDet: 31.5 GB per GPU at one image per GPU with AMP; model.backbone.net.use_act_checkpoint=True for smaller cards.
"""
from detectron2.config import LazyCall as L

from mae_transfer.det import layer_decay_lr_factor, vitdet_arch

from .mask_rcnn_vit_base_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth"
model.backbone.net.update(vitdet_arch("huge"), drop_path_rate=0.5)  # global attention in blocks 7, 15, 23, 31
optimizer.params.lr_factor_func = L(layer_decay_lr_factor)(depth="${model.backbone.net.depth}", decay=0.9)
# ViTDet's ViT-H decays every parameter, norms and position embedding included.
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None
