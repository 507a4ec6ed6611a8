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
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of `net` over `loader`, and the count of unreadable
    images (each replaced by the next readable one, so that image counts twice; batches are the dataset's
    (images, labels, unreadable counts)).

    Totals are summed exactly (correct counts, not averaged batch accuracies); with `sharded` (--dist_eval) each
    process has seen a disjoint part of the set and the totals are summed over processes. Top-5 means top-min(5, C).
    `net` must be the bare model, not its DistributedDataParallel wrapper: shards may differ in length by a batch.
    """
    net.eval()
    device = precision.device
    # loss sum, top-1 hits, top-5 hits, images, unreadable images
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    bar = progress_bar(len(loader), "eval", enabled=show_progress)
    for images, target, unreadable in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with precision.autocast():
            logits = net(images)
        logits = logits.float()
        n = target.shape[0]
        # timm returns percentages of this batch; back to (integer) hit counts so totals stay exact
        hits1, hits5 = (torch.round(acc.double() * n / 100) for acc in accuracy(logits, target, topk=(1, 5)))
        totals[:3] += torch.stack([F.cross_entropy(logits, target, reduction="sum").double(), hits1, hits5])
        # Python scalars: no host-to-device copy, which would wait for the GPU every batch
        totals[3] += n
        totals[4] += int(unreadable.sum())
        bar.update(1)
    bar.close()
    if sharded:
        all_reduce(totals)
    loss, hits1, hits5, count, unreadable_count = totals.tolist()
    if count == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": 100 * hits1 / count, "top5": 100 * hits5 / count, "loss": loss / count, "images": int(count),
            "unreadable_images": int(unreadable_count)}
