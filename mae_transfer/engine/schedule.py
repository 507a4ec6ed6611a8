"""The MAE learning-rate schedule: per-iteration linear warmup from 0, then a half-cycle cosine down to min_lr.

    lr(t) = lr * t / W                                         for t < W
    lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2   afterwards

with t, W, T counted in data iterations (the reference evaluates it at epoch + iteration / iters_per_epoch, which is
the same thing). timm's CosineLRScheduler computes exactly this with warmup_prefix and iteration-level updates, and
multiplies each group's 'lr_scale' into the result, as the reference's fine-tuning does.
"""
from timm.scheduler import CosineLRScheduler
from torch.optim import Optimizer

__all__ = ["warmup_cosine"]


def warmup_cosine(optimizer: Optimizer, *, epochs: int, warmup_epochs: float, iters_per_epoch: int,
                  min_lr: float = 0.0) -> CosineLRScheduler:
    """A schedule for `optimizer` (its groups' lr is the peak); call `.step_update(t)` before iteration t."""
    warmup = round(warmup_epochs * iters_per_epoch)
    total = epochs * iters_per_epoch
    # A run no longer than its warmup ends inside it, as the reference's does (short smoke runs); timm needs a cosine
    # phase of at least one iteration, which such a run never reaches.
    return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=min_lr, warmup_t=warmup,
                             warmup_lr_init=0.0, warmup_prefix=True, cycle_limit=1, t_in_epochs=False)
