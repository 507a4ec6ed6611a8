"""The effective batch of a run: batch_size per process x accum_iter x processes."""
from typing import Optional

__all__ = ["resolve_accum_iter"]


def resolve_accum_iter(batch_size: int, world_size: int, *, accum_iter: Optional[int] = None,
                       effective_batch_size: Optional[int] = None) -> int:
    """Gradient-accumulation steps: `accum_iter` as given (default 1), or the number that reaches
    `effective_batch_size` with `batch_size` on each of `world_size` processes (a recipe's batch on any GPU count)."""
    if effective_batch_size is None:
        return accum_iter or 1
    per_step = batch_size * world_size
    accum, rest = divmod(effective_batch_size, per_step)
    if rest or accum < 1:
        raise ValueError(f"--effective_batch_size {effective_batch_size} is not a multiple of batch_size x "
                         f"processes = {batch_size} x {world_size}; change --batch_size or --effective_batch_size, "
                         "or set --accum_iter")
    if accum_iter is not None and accum_iter != accum:
        raise ValueError(f"--accum_iter {accum_iter} contradicts --effective_batch_size {effective_batch_size} with "
                         f"batch_size {batch_size} on {world_size} processes (needs {accum}); give only one of them")
    return accum
