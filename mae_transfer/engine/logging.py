"""What a training run shows and records: a progress bar per epoch, TensorBoard scalars (and pictures), and a
JSON-lines log that opens with a record of exactly what ran.

Only the main process writes; the others get disabled sinks, so training code needs no rank checks.
"""
import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import timm
import torch
from PIL import Image
from tqdm import tqdm

from .amp import Precision
from .batch import BatchPlan
from .distributed import DistInfo

__all__ = ["RunLog", "open_run_log", "progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar whose ETA comes from its own rate; postfix fields (loss, lr, images/s) are set by the caller."""
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep the record readable by strict parsers
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class RunLog:
    """Scalars to TensorBoard (under `tensorboard_dir`) and records to a JSON-lines file, one object per line.

    Each record has a 'kind' ('step' for a logging step, 'epoch' for an epoch summary, or the caller's own), a
    wall-clock 'time', and the caller's fields; numeric fields also go to TensorBoard as '{kind}/{field}'.
    """

    def __init__(self, jsonl_path: Optional[Path], tensorboard_dir: Optional[Path], enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl_path is not None:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", encoding="utf-8")  # resumed runs append
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: TensorBoard is slow to import
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, kind: str, step: int, fields: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record: Dict[str, Any] = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, default=str) + "\n")  # default: a Path among the args
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def image(self, tag: str, step: int, picture: Image.Image) -> None:
        """A picture to TensorBoard's images tab (JSON lines hold numbers only)."""
        if self._tb is not None:
            self._tb.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self._tb.flush()  # pictures come rarely (one per checkpoint): on disk at once

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def open_run_log(args: argparse.Namespace, plan: BatchPlan, precision: Precision, dist: DistInfo,
                 resumed_from: Optional[Path]) -> RunLog:
    """A run's log as the MAE reference lays it out (log.jsonl in --output_dir, TensorBoard in --log_dir, else
    --output_dir), opened by the main process with its run record: first, and again at every resumption."""
    log = RunLog(Path(args.output_dir) / "log.jsonl", Path(args.log_dir or args.output_dir), enabled=dist.is_main)
    if log.enabled:  # the record asks git and the hardware: not on every rank of a large job
        log.write("run", args.start_epoch * plan.iters_per_epoch,
                  _run_record(args, plan, precision, dist, resumed_from=resumed_from))
    return log


def _run_record(args: argparse.Namespace, plan: BatchPlan, precision: Precision, dist: DistInfo,
                resumed_from: Optional[Path]) -> Dict[str, Any]:
    """What a run (or a resumption of it) was: its command, every setting as resolved (preset, scaled lr, start
    epoch, --amp auto's choice), its batch plan, the checkpoint it resumed, and the software and hardware.
    Reproduction gaps of a few tenths are often a version, a GPU count or a setting apart, and the reference's logs
    record none of them."""
    return {"argv": sys.argv, "args": vars(args), "plan": {**dataclasses.asdict(plan), "effective": plan.effective},
            "precision": precision.mode, "resumed_from": str(resumed_from) if resumed_from else None,
            "environment": _environment(dist)}


def _environment(dist: DistInfo) -> Dict[str, Any]:
    """Versions of what computes (Python, torch, CUDA, cuDNN, timm, NumPy, this package and its source commit) and
    where (processes, this process's device, CPU and threads)."""
    env: Dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "timm": timm.__version__, "numpy": np.__version__, "mae_transfer": _package_version(),
        "mae_transfer_path": str(Path(__file__).resolve().parents[1]), "source_commit": _source_commit(),
        "world_size": dist.world_size, "device": str(dist.device), "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads()}
    if dist.device.type == "cuda":
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu=torch.cuda.get_device_name(dist.device), gpus_visible=torch.cuda.device_count())
    return env


def _package_version() -> Optional[str]:
    """The installed distribution's version (mae_transfer_path says which source ran: a checkout on PYTHONPATH may
    shadow an installed copy)."""
    try:
        return metadata.version("mae-transfer")
    except metadata.PackageNotFoundError:
        return None


def _source_commit() -> Optional[str]:
    """The commit this package's source is at when it runs from a git checkout (an editable install), with
    '-dirty' when tracked files differ from it; None for an installed copy or where git is not at hand."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():  # not ours: an installed copy may sit inside someone else's repository
        return None
    try:
        # --no-optional-locks: status would otherwise refresh the index under a lock another git process may want
        commit, changed = (subprocess.run(["git", "--no-optional-locks", "-C", str(root), *command],
                                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()
                           for command in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):  # no git, or it refuses the folder (safe.directory)
        return None
    return commit + ("-dirty" if changed else "")


def _cpu_name() -> str:
    try:  # platform.processor() says only "x86_64" on Linux
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
