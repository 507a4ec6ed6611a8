"""Mask R-CNN, ViT-L/16 MAE backbone, ViTDet's 100-epoch COCO recipe.

Expected on COCO val2017 (ViTDet, MAE IN1K ViT-L): box AP 55.5, mask AP 49.2.
ViTDet: 20.9 GB per GPU at one image per GPU with AMP; model.backbone.net.use_act_checkpoint=True for 24 GB cards.
"""
from detectron2.config import LazyCall as L

from mae_transfer.det import layer_decay_lr_factor, vitdet_arch

from .mask_rcnn_vit_base_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"
model.backbone.net.update(vitdet_arch("large"), drop_path_rate=0.4)  # global attention in blocks 5, 11, 17, 23
optimizer.params.lr_factor_func = L(layer_decay_lr_factor)(depth="${model.backbone.net.depth}", decay=0.8)
