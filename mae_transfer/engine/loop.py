"""One training epoch, shared by pretraining and fine-tuning: the task supplies only `step_fn(model, batch)`.

Per data iteration: the schedule sets the learning rate (at the start of each accumulation window), the forward
runs under the precision's autocast, the loss is scaled by 1/accum_iter and backpropagated (DDP synchronises
gradients only on the last micro-batch of a window), and the optimizer steps at the end of each window.

Losses stay on the device between logging steps, so a CUDA step never waits for the host. At each logging step
they are reduced over processes for the bar and the logs, and checked: a non-finite loss stops the run with the
exact iteration it appeared at, before anything is saved.
"""
import math
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, List, NoReturn, Optional, Tuple

import torch
from torch import nn
from torch.distributed import ReduceOp
from torch.nn.parallel import DistributedDataParallel

from .amp import Precision
from .distributed import all_reduce, get_world_size, is_main_process
from .logging import RunLog, progress_bar

__all__ = ["NonFiniteLossError", "EpochResult", "StepFn", "train_one_epoch", "skip_gradient_sync", "exit_on_non_finite"]

# (model, batch) -> (loss, counts): counts are integers summed over the epoch and all processes (e.g. images
# that could not be read), reported with the epoch's result.
StepFn = Callable[[nn.Module, Any], Tuple[torch.Tensor, Dict[str, int]]]


class NonFiniteLossError(FloatingPointError):
    """The run diverged at a step: its loss was non-finite or, with `weights`, its loss was finite but its update
    left non-finite weights (a non-finite gradient, which no grad scaler checks in fp32 or bf16)."""

    def __init__(self, iteration: int, epoch: int, epoch_iteration: int, value: float, weights: bool = False):
        self.iteration, self.epoch, self.epoch_iteration, self.value = iteration, epoch, epoch_iteration, value
        what = (f"the weights are non-finite after the update at step {iteration}" if weights else
                f"loss is {value} at step {iteration}")
        super().__init__(f"{what} (epoch {epoch}, iteration {epoch_iteration}); stopping the run")


def exit_on_non_finite(err: NonFiniteLossError, log: RunLog, last_checkpoint: Optional[Path]) -> NoReturn:
    """End the run over `err`: record it in the log and exit with a message naming the step and the checkpoint
    to resume from (nothing is saved after a non-finite loss, so that checkpoint is intact)."""
    log.write("error", err.iteration, {"epoch": err.epoch, "message": str(err)})
    log.close()
    raise SystemExit(f"{err}. Nothing was saved after it; the last good checkpoint "
                     f"({last_checkpoint or 'none was written yet'}) is intact.")


@dataclass
class EpochResult:
    loss: float                 # mean over the epoch's iterations and all processes
    lr: float                   # the largest group learning rate at the last iteration
    iterations: int             # data iterations run in this epoch
    iteration: int              # data iterations run since the start of training
    images_per_s: float         # over all processes
    counts: Dict[str, int] = field(default_factory=dict)
    stopped: bool = False       # max_iterations was reached


def _max_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


def _first_nonfinite(losses: List[torch.Tensor], first_iteration: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses, iteration of the first non-finite one or +inf), as device tensors for all_reduce."""
    values = torch.stack(losses).float()
    bad = ~torch.isfinite(values)
    positions = torch.arange(len(values), device=values.device, dtype=torch.float64) + first_iteration
    first_bad = torch.where(bad, positions, torch.full_like(positions, math.inf)).min()
    return values.sum().to(torch.float64), first_bad


def skip_gradient_sync(model: nn.Module) -> ContextManager:
    """DDP's no_sync() for a micro-batch that does not end an accumulation window; `model` may be DDP itself or
    torch.compile's wrapper of it (the recommended order), which is not a DistributedDataParallel instance."""
    ddp = getattr(model, "_orig_mod", model)
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else nullcontext()


def train_one_epoch(model: nn.Module, step_fn: StepFn, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler, precision: Precision, *, epoch: int, iters_per_epoch: int, batch_size: int,
                    accum_iter: int = 1, log: Optional[RunLog] = None, log_every: int = 20,
                    max_iterations: Optional[int] = None, clip_grad: Optional[float] = None) -> EpochResult:
    """Train for one epoch of `iters_per_epoch` data iterations (a multiple of accum_iter).

    `scheduler` has `.step_update(iteration)` (timm's schedulers). Iterations are counted globally from the start
    of training, epoch * iters_per_epoch + i; `max_iterations` (global) ends the epoch early, for smoke runs.
    """
    if iters_per_epoch % accum_iter:
        raise ValueError(f"iters_per_epoch ({iters_per_epoch}) must be a multiple of accum_iter ({accum_iter})")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    world = get_world_size()
    first = epoch * iters_per_epoch
    bar = progress_bar(iters_per_epoch, f"epoch {epoch}", enabled=is_main_process())
    counts: Counter = Counter()
    pending: List[torch.Tensor] = []
    pending_start = first
    loss_sum, loss_n = 0.0, 0
    t_epoch = t_log = time.perf_counter()
    done = 0
    stopped = False

    for i, batch in zip(range(iters_per_epoch), loader):  # range first: never fetch a batch beyond the epoch
        iteration = first + i
        if i % accum_iter == 0:
            scheduler.step_update(iteration)
        update = (i + 1) % accum_iter == 0
        sync = nullcontext() if update else skip_gradient_sync(model)
        with sync:
            with precision.autocast():
                loss, step_counts = step_fn(model, batch)
            precision.backward(loss / accum_iter, optimizer, update=update, clip_grad=clip_grad,
                               parameters=model.parameters())
        pending.append(loss.detach())
        counts.update(step_counts)
        done = i + 1
        bar.update(1)
        stopped = max_iterations is not None and iteration + 1 >= max_iterations and update

        if done % log_every == 0 or done == iters_per_epoch or stopped:
            window_sum, first_bad = _first_nonfinite(pending, pending_start)
            totals = all_reduce(torch.stack([window_sum, torch.tensor(float(len(pending)), dtype=torch.float64,
                                                                      device=window_sum.device)]))
            first_bad = all_reduce(first_bad, ReduceOp.MIN).item()
            if math.isfinite(first_bad):
                bad = int(first_bad)
                # This process's loss at that step may be finite; their mean, the loss the run logs, is not.
                value = (all_reduce(pending[bad - pending_start].double()) / world).item()
                bar.close()
                raise NonFiniteLossError(bad, epoch, bad - first, value)
            window_loss = (totals[0] / totals[1]).item()
            loss_sum += totals[0].item()
            loss_n += int(totals[1].item())
            now = time.perf_counter()
            images_per_s = len(pending) * batch_size * world / (now - t_log)
            lr = _max_lr(optimizer)
            bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.1f}", refresh=False)
            if log is not None:
                log.write("step", iteration + 1, {"epoch": epoch, "loss": window_loss, "lr": lr,
                                                  "images_per_s": images_per_s})
            pending, pending_start, t_log = [], iteration + 1, now
        if stopped:
            break

    bar.close()
    # Weights a non-finite gradient spoiled would give the next iteration a non-finite loss, but the epoch's last
    # update has no next iteration before the checkpoint: check them (one pass over the parameters an epoch).
    if done and not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
        raise NonFiniteLossError(first + done - 1, epoch, done - 1, math.nan, weights=True)
    elapsed = time.perf_counter() - t_epoch
    names = sorted(counts)
    if names:  # same keys on every process: step_fn reports every count at every step
        summed = all_reduce(torch.tensor([counts[k] for k in names], dtype=torch.float64, device=precision.device))
        counts = Counter({k: int(v) for k, v in zip(names, summed.tolist())})
    return EpochResult(loss=loss_sum / max(loss_n, 1), lr=_max_lr(optimizer), iterations=done,
                       iteration=first + done, images_per_s=done * batch_size * world / max(elapsed, 1e-9),
                       counts=dict(counts), stopped=stopped)
