"""COCO instances with ViTDet's large-scale jitter (LSJ) at 1024 px, read from paths that any COCO-format dataset
can replace on the command line:

    dataloader.train.dataset.json_file=... dataloader.train.dataset.image_root=...
    dataloader.test.dataset.json_file=...  dataloader.test.dataset.image_root=...

Defaults follow detectron2's layout: $DETECTRON2_DATASETS/coco/{annotations,train2017,val2017} ("datasets" if unset).
Masks are read as polygons, as COCO's are; a dataset with RLE masks on its objects needs
dataloader.train.mapper.instance_mask_format=bitmask.
"""
import os

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from mae_transfer.det import coco_instances

_coco = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "coco")  # as detectron2

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset = L(coco_instances)(
    name="coco_2017_train",
    json_file=os.path.join(_coco, "annotations/instances_train2017.json"),
    image_root=os.path.join(_coco, "train2017"),
)
dataloader.test.dataset = L(coco_instances)(
    name="coco_2017_val",
    json_file=os.path.join(_coco, "annotations/instances_val2017.json"),
    image_root=os.path.join(_coco, "val2017"),
    filter_empty=False,
)
dataloader.evaluator.dataset_name = "${..test.dataset.name}"
# Mask R-CNN: box and mask AP always (COCOEvaluator infers the tasks from the predictions, so a model that detects
# nothing yet would report box AP only).
dataloader.evaluator.tasks = ("bbox", "segm")

image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),  # the backbone pads to a square
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes from the cropped masks
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]
