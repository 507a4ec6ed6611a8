"""torch.distributed set-up from the environment torchrun provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

One process per GPU over NCCL, or processes on CPU over gloo; without torchrun everything runs in one process and
the collectives below are no-ops, so training code calls them unconditionally.
"""
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistInfo", "init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process",
           "distributed_run", "data_parallel", "all_reduce", "all_gather_object", "seed_everything"]

# How long a collective waits for every process, as detectron2's launch sets it (and torch for every backend but
# NCCL): rank 0 alone writes checkpoints (a ViT-H training state is 7.6 GB) while the others wait at the next step's
# all-reduce, and NCCL's default, 10 minutes, would end a run on a slow shared filesystem.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print, on the main process only."""
        if self.is_main:
            print(*args, **kwargs)


def _resolve_device(device: Optional[str], local_rank: int, world_size: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: no CUDA device is visible; use --device cpu")
        if dev.index is not None and world_size > 1:
            raise ValueError(f"--device {device} would put all {world_size} processes on one GPU: use --device "
                             "cuda (each process takes the GPU of its LOCAL_RANK)")
        if dev.index is None:
            visible = torch.cuda.device_count()
            if visible == 1:  # launchers that give each process its own CUDA_VISIBLE_DEVICES show it as cuda:0
                dev = torch.device("cuda", 0)
            elif local_rank < visible:
                dev = torch.device("cuda", local_rank)
            else:
                raise ValueError(f"process {local_rank} of this node has no GPU of its own: {visible} are visible; "
                                 f"start at most {visible} processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun described (if any) and pick this process's device.

    `device`: 'cuda', 'cpu', 'cuda:N' or None for CUDA when available. Under torchrun each process takes the GPU
    of its LOCAL_RANK, and the backend follows the device: NCCL for CUDA, gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _resolve_device(device, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def data_parallel(model: nn.Module, dist: DistInfo) -> nn.Module:
    """`model` in DistributedDataParallel (on this process's GPU, if any) when there are several processes; else
    `model` itself."""
    if dist.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over all processes (identity in a single process); returns `tensor`."""
    if is_distributed():
        dist.all_reduce(tensor, op=op)
    return tensor


def all_gather_object(obj: Any) -> List[Any]:
    """Every process's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def distributed_run(device: Optional[str] = None) -> Iterator[DistInfo]:
    """init_distributed for the length of a run, then leave the process group. At a normal end every rank first
    waits for all the others (a rank tearing down its gloo group while rank 0 still wrote the final export was seen
    to hang in a 2-process CPU run); a rank leaving over an error does not wait, since the others may never arrive.

    On a GPU the run autotunes cuDNN's convolutions, as the reference's scripts do (cudnn.benchmark: a run's input
    size is fixed, so the patch embedding's algorithm is found once and pays at every step); the setting is put
    back when the run ends."""
    info = init_distributed(device)
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = autotune or info.device.type == "cuda"
    try:
        yield info
    except BaseException:
        if is_distributed():
            dist.destroy_process_group()
        raise
    finally:
        torch.backends.cudnn.benchmark = autotune
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
