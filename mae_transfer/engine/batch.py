"""The effective batch of a run (batch_size per process x accum_iter x processes) and the loader that serves it."""
from dataclasses import dataclass
from typing import Optional, Tuple

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .distributed import DistInfo

__all__ = ["BatchPlan", "BatchPlanError", "resolve_accum_iter", "training_loader"]


class BatchPlanError(ValueError):
    """Batch flags that contradict each other, or a dataset too small for one optimizer step (an input error)."""


def resolve_accum_iter(batch_size: int, world_size: int, *, accum_iter: Optional[int] = None,
                       effective_batch_size: Optional[int] = None) -> int:
    """Gradient-accumulation steps: `accum_iter` as given (default 1), or the number that reaches
    `effective_batch_size` with `batch_size` on each of `world_size` processes (a recipe's batch on any GPU count)."""
    if effective_batch_size is None:
        return accum_iter or 1
    per_step = batch_size * world_size
    accum, rest = divmod(effective_batch_size, per_step)
    if rest or accum < 1:
        raise BatchPlanError(f"--effective_batch_size {effective_batch_size} is not a multiple of batch_size x "
                             f"processes = {batch_size} x {world_size}; change --batch_size or "
                             "--effective_batch_size (an explicit --accum_iter N replaces a preset's effective batch)")
    if accum_iter is not None and accum_iter != accum:
        raise BatchPlanError(f"--accum_iter {accum_iter} contradicts --effective_batch_size {effective_batch_size} "
                             f"with batch_size {batch_size} on {world_size} processes (needs {accum}); give only one "
                             "of them")
    return accum


@dataclass(frozen=True)
class BatchPlan:
    batch_size: int       # per process
    accum_iter: int
    world_size: int
    iters_per_epoch: int  # data iterations per epoch: a whole number of optimizer steps

    @property
    def effective(self) -> int:
        return self.batch_size * self.accum_iter * self.world_size

    def __str__(self) -> str:
        return (f"effective batch {self.effective} = {self.batch_size} x {self.accum_iter} (accum) x "
                f"{self.world_size} (processes)")


def training_loader(dataset: Dataset, dist: DistInfo, *, batch_size: int, seed: int, num_workers: int,
                    pin_mem: bool, accum_iter: Optional[int] = None,
                    effective_batch_size: Optional[int] = None) -> Tuple[DataLoader, BatchPlan]:
    """A shuffling loader over this process's shard of `dataset` (its sampler wants set_epoch every epoch), and the
    run's batch plan. Raises BatchPlanError, naming the flags, when they contradict or leave no whole optimizer
    step."""
    accum = resolve_accum_iter(batch_size, dist.world_size, accum_iter=accum_iter,
                               effective_batch_size=effective_batch_size)
    # Sharded identically for every world size, so the global batch of a step is the same set of images.
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=pin_mem and dist.device.type == "cuda", drop_last=True)
    plan = BatchPlan(batch_size, accum, dist.world_size, iters_per_epoch=len(loader) // accum * accum)
    if plan.iters_per_epoch == 0:
        where = f"{dataset.root}: " if hasattr(dataset, "root") else ""  # an image folder says which
        raise BatchPlanError(f"{where}{len(dataset)} training images are too few for one optimizer step of "
                             f"{batch_size} x {accum} (accum_iter) x {dist.world_size} (processes)")
    return loader, plan
