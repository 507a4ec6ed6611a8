"""Runner checkpoints that torch.load reads with weights_only=True (its default since PyTorch 2.6).

mmengine's Runner pickles its message hub into every checkpoint: HistoryBuffer objects holding numpy arrays and, through
their statistics methods, `getattr`, which no weights-only loader may allow (it would reopen arbitrary code). So
mmengine cannot read back its own checkpoints for `load_from` or `resume`. This hook writes that state as plain lists
and numbers and rebuilds it on loading; the weights and optimizer state are tensors already. Loading stays safe and
needs no allow-list.
"""
from typing import Any

import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmseg.registry import HOOKS

__all__ = ["WeightsOnlyCheckpointHook"]

_BUFFER = "__history_buffer__"


def _plain(obj: Any) -> Any:
    """numpy values as Python numbers / lists and HistoryBuffers as marked dicts, recursively; the rest unchanged."""
    if isinstance(obj, HistoryBuffer):
        log_history, count_history = obj.data
        return {_BUFFER: True, "log_history": log_history.tolist(), "count_history": count_history.tolist(),
                "max_length": obj.max_length}
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Add to `custom_hooks` of any config whose checkpoints are loaded again (`load_from`, `--resume`)."""

    priority = "VERY_LOW"  # after every other hook has added what it saves

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in ("meta", "message_hub"):
            if key in checkpoint:
                checkpoint[key] = _plain(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        scalars = checkpoint.get("message_hub", {}).get("log_scalars", {})
        for name, value in scalars.items():
            if isinstance(value, dict) and value.get(_BUFFER):
                scalars[name] = HistoryBuffer(value["log_history"], value["count_history"], value["max_length"])
