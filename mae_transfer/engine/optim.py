"""AdamW over the parameter groups the MAE recipes define.

Weight decay skips biases, norms and every other 1-D parameter. Fine-tuning adds a per-parameter learning-rate
factor (layer-wise decay); each group carries it as 'lr_scale', which the schedule multiplies in at every update.
"""
from fnmatch import fnmatchcase
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from timm.optim import param_groups_weight_decay

__all__ = ["param_groups", "adamw", "scaled_lr"]


def scaled_lr(blr: float, effective_batch_size: int) -> float:
    """The linear scaling rule of the MAE recipes: lr = blr * effective batch / 256."""
    return blr * effective_batch_size / 256


def _no_weight_decay(name: str, param: nn.Parameter, patterns: Collection[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(fnmatchcase(name, p) for p in patterns)


def param_groups(model: nn.Module, weight_decay: float, *, no_weight_decay: Collection[str] = (),
                 lr_scale: Optional[Callable[[str], float]] = None) -> List[Dict]:
    """Split trainable parameters into optimizer groups.

    No weight decay for parameters with ndim <= 1 (biases, norm weights), names ending in '.bias', and names
    matching a glob in `no_weight_decay` (e.g. model.no_weight_decay(): pos_embed, cls_token). `lr_scale`, if given,
    maps a parameter name to its learning-rate factor, e.g. `partial(layer_decay_scale, depth=12, decay=0.65)`.
    """
    if lr_scale is None:
        # timm's grouping is the pretraining reference's rule exactly (timm 0.3.2's add_weight_decay).
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=tuple(no_weight_decay))
    # timm's param_groups_layer_decay derives layers from group_matcher(), which puts the final norm one layer
    # above the last block and the head one above that; the MAE reference puts norm and head on the same top
    # layer, so layer ids come from the caller's function instead.
    groups: Dict[Tuple[float, float], Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if _no_weight_decay(name, param, no_weight_decay) else weight_decay
        scale = lr_scale(name)
        group = groups.setdefault((scale, decay), {"params": [], "weight_decay": decay, "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def adamw(groups: Sequence[Dict], lr: float, *, betas: Tuple[float, float] = (0.9, 0.95),
          device: torch.device = torch.device("cpu")) -> torch.optim.AdamW:
    """AdamW with the MAE betas; the fused kernel (one launch for all parameters) wherever PyTorch has one."""
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))
