"""Mask R-CNN, ViT-H MAE backbone: ViTDet's released ViT-H schedule, 75 epochs.

Expected on COCO val2017 (ViTDet, MAE IN1K ViT-H): box AP 56.7, mask AP 50.2.
"""
from .mask_rcnn_vit_huge_100ep import dataloader, lr_multiplier, model, optimizer, train

train.max_iter = train.max_iter * 3 // 4
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
# warmup_length stays a fraction (250 / 184375) of the now shorter run: 187 iterations, as in ViTDet's own 75-epoch
# config, whose numbers these are.
