"""Shared by the pretraining tests: tiny image folders drawn with PIL, and tiny runs of pretrain/main_pretrain.py."""
import argparse
import os
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from mae_transfer.engine import DistInfo

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pretrain" / "main_pretrain.py"

# CUDA tests run bf16 only on GPUs that compute in it (Ampere and newer; --amp auto picks fp16 on the others).
needs_native_bf16 = pytest.mark.skipif(
    torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False),
    reason="the GPU does not compute in bf16")


def make_image_folder(root: Path, n: int, size: int = 40, seed: int = 0, corrupt: Iterable[int] = ()) -> List[Path]:
    """n PNGs named 000.png.. (a colour gradient with a rectangle: structure an MAE can learn); the indices in
    `corrupt` are written as files that no decoder can read."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        path = root / f"{i:03d}.png"
        if i in set(corrupt):
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(64))  # PNG signature, garbage after it
        else:
            a, b, c = rng.uniform(0, 1, (3, 3))
            img = np.stack([a[k] * xx + b[k] * yy + c[k] * 0.3 for k in range(3)], -1)
            top, left = rng.integers(0, size // 2, 2)
            img[top:top + size // 3, left:left + size // 3] = rng.uniform(0, 1, 3)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_flags(data: Path, out: Path, **overrides) -> List[str]:
    """Flags for a ViT-Tiny MAE at 32 px (4 patches, 1 visible) that runs a few steps in about a second."""
    flags: Dict[str, object] = dict(model="mae_vit_tiny_patch16", input_size=32, batch_size=4, epochs=3,
                                    warmup_epochs=1, blr=1e-2, num_workers=0, save_every=1, log_every=1, seed=0,
                                    device="cpu", data_path=data, output_dir=out)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


@contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP threads that spin while other processes hold the cores
    can make them tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Seeded(Exception):
    pass


def seed_of_rank_3(module, run: Callable[[DistInfo], object], monkeypatch) -> int:
    """The seed a training script's `run` (given rank 3 of 4) seeds its generators with; the run stops there."""
    seeds = []

    def seed_everything(seed):
        seeds.append(seed)
        raise _Seeded  # the rest of the run is not the question

    monkeypatch.setattr(module, "seed_everything", seed_everything)
    with pytest.raises(_Seeded):
        run(DistInfo(rank=3, local_rank=3, world_size=4, device=torch.device("cpu")))
    return seeds[0]


def subprocess_env() -> Dict[str, str]:
    """The test environment for child processes: the repo importable, one thread (see one_thread)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def run_tool(cmd: List[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd` (e.g. torchrun and its workers) in its own process group. If it outlives `timeout`, every process
    in the group is sent SIGABRT, on which Python's faulthandler prints each thread's stack: the failure shows where
    each process was waiting, and no worker is left behind."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(subprocess_env(), PYTHONFAULTHANDLER="1"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        out, err = proc.communicate()
        raise AssertionError(f"{shlex.join(cmd)} did not end in {timeout:.0f}s; its output, then every process's "
                             f"stacks:\n{out[-4000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_main(argv: List[str], launcher: List[str] = (sys.executable,)) -> subprocess.CompletedProcess:
    return run_tool([*launcher, str(MAIN), *map(str, argv)])


def as_reference_checkpoint(ours: Path, theirs: Path, *, unrecorded: Sequence[str] = (),
                            order: Callable[[List[str]], List[str]] = list,
                            groups: Optional[Callable[[List[str], Dict[str, torch.Size]], List[List[str]]]] = None
                            ) -> None:
    """Our training checkpoint `ours` rewritten as the MAE reference's misc.save_model writes one: model, optimizer,
    epoch, scaler and args (an argparse.Namespace, without the flags in `unrecorded`); no iteration count, no
    generators, the step counts as the ints of the torch it ran on. The model's keys come in `order` of ours; with
    `groups` (the reference's rule: parameter names in registration order -> its optimizer groups), the optimizer's
    state is numbered as the reference's would be in that order."""
    state = torch.load(ours, weights_only=True)
    optimizer = state["optimizer"]
    for moments in optimizer["state"].values():
        moments["step"] = int(moments["step"])
    for group in optimizer["param_groups"]:
        for key in ("fused", "foreach", "capturable", "differentiable", "decoupled_weight_decay", "initial_lr"):
            group.pop(key, None)
    names = order(list(state["model"]))
    if groups is not None:
        shapes = {name: value.shape for name, value in state["model"].items()}
        ours_grouped = groups(list(state["model"]), shapes)  # our numbering, if the rule is ours
        assert [len(g) for g in ours_grouped] == [len(g["params"]) for g in optimizer["param_groups"]]
        our_index = {name: i for i, name in enumerate(n for g in ours_grouped for n in g)}
        settings = {n: saved for g, saved in zip(ours_grouped, optimizer["param_groups"]) for n in g}
        their_grouped = groups(names, shapes)
        their_index = {name: i for i, name in enumerate(n for g in their_grouped for n in g)}
        optimizer = {"state": {their_index[n]: optimizer["state"][our_index[n]] for n in their_index
                               if our_index[n] in optimizer["state"]},
                     "param_groups": [{**{k: v for k, v in settings[g[0]].items() if k != "params"},
                                       "params": [their_index[n] for n in g]} for g in their_grouped]}
    args = argparse.Namespace(**{k: v for k, v in state["args"].items() if k not in unrecorded})
    torch.save({"model": {k: state["model"][k] for k in names}, "optimizer": optimizer, "epoch": state["epoch"],
                "scaler": state["scaler"], "args": args}, theirs)
