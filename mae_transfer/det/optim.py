"""Layer-wise lr decay for the ViTDet backbone through detectron2's get_default_optimizer_params(lr_factor_func=...),
with the one decay rule of mae_transfer.models.layer_decay (the same factors as detectron2's get_vit_lr_decay_rate
for every parameter of a ViTDet model)."""
from functools import partial
from typing import Callable

from ..models.layer_decay import layer_decay_scale

__all__ = ["layer_decay_lr_factor"]


def layer_decay_lr_factor(depth: int, decay: float) -> Callable[[str], float]:
    """name -> decay ** (depth + 1 - layer id): patch/pos embedding layer 0, block i layer i + 1, the rest
    (pyramid, RPN, ROI heads) depth + 1, i.e. factor 1."""
    return partial(layer_decay_scale, depth=depth, decay=decay)
