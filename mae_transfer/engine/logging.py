"""What a training run shows and records: a progress bar per epoch, TensorBoard scalars (and pictures), and a
JSON-lines log.

Only the main process writes; the others get disabled sinks, so training code needs no rank checks.
"""
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

__all__ = ["RunLog", "progress_bar"]


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar whose ETA comes from its own rate; postfix fields (loss, lr, images/s) are set by the caller."""
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep the record readable by strict parsers
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
            self._jsonl.write(json.dumps(record) + "\n")
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
