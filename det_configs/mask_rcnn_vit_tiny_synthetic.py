r"""Mask R-CNN with a ViT-Tiny/16 backbone on the synthetic shapes world: the ViTDet design at 128 px, small enough
to train and evaluate on a laptop CPU in minutes. Tests and the demo use it; the 100-epoch configs are the real ones.

    python -m mae_transfer.data.synthetic --out data/world --size small
    python tools/train_det.py --config-file det_configs/mask_rcnn_vit_tiny_synthetic.py \
        train.init_checkpoint=<a ViT-Tiny MAE checkpoint, e.g. from pretrain/main_pretrain.py --preset tiny>

Not a benchmark: it shows the whole path learning, a little. In the demo's 300 iterations (batch 4, ~3 min) it
reaches box AP ~1-2 / AP50 4-7 (tools/demo.py; README). Measured from the MAE encoder at that budget: with 64
sampled RoIs per image (objects a few percent of them) the classifier scores every RoI as background (AP 0.0 at lr
4e-4, batch 8, 100 iterations); 16 RoIs and 64 RPN anchors per image at batch 4 give AP 0.1 at lr 4e-4 after 200
iterations, and 1.8 at lr 1e-3 after 300.
"""
import torch

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from mae_transfer.data.synthetic import CATEGORIES
from mae_transfer.det import vitdet_arch

from .mask_rcnn_vit_base_100ep import dataloader, lr_multiplier, model, optimizer, train

image_size = 128
world = "data/world/coco"  # python -m mae_transfer.data.synthetic --out data/world

dataloader.train.dataset.update(name="synthetic_coco_train", json_file=f"{world}/annotations/instances_train.json",
                                image_root=f"{world}/train")
dataloader.test.dataset.update(name="synthetic_coco_val", json_file=f"{world}/annotations/instances_val.json",
                               image_root=f"{world}/val")
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]
dataloader.train.mapper.instance_mask_format = "bitmask"  # the world's masks are RLE, not polygons
dataloader.train.total_batch_size = 4  # more, smaller steps: what a few CPU minutes train best
dataloader.train.num_workers = dataloader.test.num_workers = 1

# ViT-Tiny as the tiny pretraining preset makes it (64 px, a 4x4 position grid); 8x8 tokens at 128 px, 4x4 windows.
model.backbone.net.update(vitdet_arch("tiny"), img_size=image_size, pretrain_img_size=64, window_size=4,
                          drop_path_rate=0.0)
model.backbone.square_pad = image_size
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]  # objects of 10-60 px
model.roi_heads.num_classes = len(CATEGORIES)
# Heads and proposal counts sized for a few objects in 128 px images: COCO's (256-channel pyramid, 256-channel
# 4conv1fc box and mask heads on 1000 proposals) spend ~15 s per iteration and ~9 s per test image on 2 cores.
channels, head_dim = 128, 64
model.backbone.out_channels = model.proposal_generator.head.in_channels = channels
model.proposal_generator.pre_nms_topk = (1000, 500)  # (train, test)
model.proposal_generator.post_nms_topk = (256, 100)
model.roi_heads.batch_size_per_image = 16  # objects are few: keep positives a sizeable share (docstring)
model.proposal_generator.batch_size_per_image = 64
model.roi_heads.box_head.update(input_shape=ShapeSpec(channels=channels, height=7, width=7),
                                conv_dims=[head_dim] * 4, fc_dims=[4 * head_dim])
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=4 * head_dim)
model.roi_heads.mask_head.update(input_shape=ShapeSpec(channels=channels, height=14, width=14),
                                 conv_dims=[head_dim] * 5)

train.device = "cuda" if torch.cuda.is_available() else "cpu"
train.init_checkpoint = ""
train.output_dir = "runs/det_vit_tiny_synthetic"
train.seed = 0
train.max_iter = 400
train.eval_period = 400
train.log_period = 20
train.checkpointer.period = 200
lr_multiplier.scheduler.milestones = [340, 380]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 40 / train.max_iter
optimizer.lr = 1e-3
optimizer.params.lr_factor_func.decay = 0.8
