"""Detection transfer: MAE encoders as ViTDet backbones of detectron2's Mask R-CNN (configs in det_configs/,
training with tools/train_det.py)."""
from .backbone import FusedAttention, ViT, global_attention_blocks, vitdet_arch
from .checkpointer import ViTDetCheckpointer, encoder_to_detectron2, load_encoder
from .datasets import check_num_classes, coco_instances, register_coco
from .evaluation import AP_FILE, ap_table, evaluate, write_ap_json
from .optim import layer_decay_lr_factor

__all__ = ["AP_FILE", "FusedAttention", "ViT", "ViTDetCheckpointer", "ap_table", "check_num_classes",
           "coco_instances", "encoder_to_detectron2", "evaluate", "global_attention_blocks", "layer_decay_lr_factor",
           "load_encoder", "register_coco", "vitdet_arch", "write_ap_json"]
