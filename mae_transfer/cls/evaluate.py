"""Classification metrics: top-1 / top-5 accuracy (timm.utils.accuracy) and cross-entropy on a validation set."""
from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from timm.utils import accuracy

from ..engine import Precision, all_reduce, progress_bar

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(net: nn.Module, loader: Iterable, precision: Precision, *, sharded: bool = False,
             show_progress: bool = True) -> Dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of `net` over `loader`.

    Totals are summed exactly (correct counts, not averaged batch accuracies); with `sharded` (--dist_eval) each
    process has seen a disjoint part of the set and the totals are summed over processes. Top-5 means top-min(5, C).
    `net` must be the bare model, not its DistributedDataParallel wrapper: shards may differ in length by a batch.
    """
    net.eval()
    device = precision.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    bar = progress_bar(len(loader), "eval", enabled=show_progress)
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        target = batch[1].to(device, non_blocking=True)
        with precision.autocast():
            logits = net(images)
        logits = logits.float()
        n = target.shape[0]
        # timm returns percentages of this batch; back to (integer) hit counts so totals stay exact
        hits1, hits5 = (torch.round(acc.double() * n / 100) for acc in accuracy(logits, target, topk=(1, 5)))
        totals[:3] += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(), hits1, hits5])
        totals[3] += n  # a Python scalar: no host-to-device copy, which would wait for the GPU every batch
        bar.update(1)
    bar.close()
    if sharded:
        all_reduce(totals)
    loss, hits1, hits5, count = totals.tolist()
    if count == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100 * hits1 / count, "top5": 100 * hits5 / count, "loss": loss / count, "images": int(count)}
