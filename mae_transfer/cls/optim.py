"""The optimizer of each transfer protocol, over the engine's parameter groups.

Fine-tuning and partial fine-tuning: AdamW (PyTorch's default betas, as the reference's main_finetune.py) with
layer-wise learning-rate decay (the one rule in mae_transfer.models.layer_decay) and no weight decay on biases, norm
parameters, pos_embed and cls_token. Linear probing: LARS with momentum 0.9 (the reference's main_linprobe.py).
Frozen parameters are in no group.
"""
from functools import partial

import torch
from torch import nn

from ..engine import adamw, param_groups
from ..models import layer_decay_scale
from .lars import LARS
from .model import resolve_mode

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = {"finetune": "adamw", "partial": "adamw", "linprobe": "lars"}


def build_optimizer(net: nn.Module, mode: str, *, lr: float, weight_decay: float, layer_decay: float = 1.0,
                    partial_blocks: int = 0, device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    mode = resolve_mode(mode, partial_blocks)
    no_weight_decay = sorted(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else []
    if OPTIMIZERS[mode] == "lars":
        return LARS(param_groups(net, weight_decay, no_weight_decay=no_weight_decay), lr=lr,
                    weight_decay=weight_decay)
    scale = partial(layer_decay_scale, depth=len(net.blocks), decay=layer_decay)
    groups = param_groups(net, weight_decay, no_weight_decay=no_weight_decay, lr_scale=scale)
    return adamw(groups, lr, betas=(0.9, 0.999), device=device)
