"""Loading a canonical state dict into a model, with one clear report of what happened to every tensor."""
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .io import CheckpointError

__all__ = ["LoadReport", "load_into", "load_whole_model", "summarize_keys"]


def _index_runs(indices: Iterable[int]) -> str:
    """0, 1, 2, 3, 7, 9, 10 -> '0..3,7,9..10'."""
    runs: List[List[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def summarize_keys(keys: Iterable[str]) -> List[str]:
    """Collapse numbered module indices: 12 x 'blocks.N.norm1.weight' -> 'blocks.{0..11}.norm1.weight'; blocks 3
    and 9 only -> 'blocks.{3,9}.norm1.weight'."""
    groups: Dict[str, List[int]] = {}
    for k in keys:
        m = re.search(r"\.(\d+)\.", k)
        pattern = k if m is None else k[:m.start()] + ".{}." + k[m.end():]
        groups.setdefault(pattern, []).append(int(m.group(1)) if m else -1)
    return sorted(pattern.replace("{}", "{" + _index_runs(idx) + "}") if "{}" in pattern else pattern
                  for pattern, idx in groups.items())


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)       # in the model, not in the checkpoint: initialised here
    dropped: List[str] = field(default_factory=list)   # in the checkpoint, not used by the model
    source: str = "checkpoint"

    def __str__(self) -> str:
        def block(title, keys):
            if not keys:
                return f"  {title}: none"
            return f"  {title} ({len(keys)}):\n" + "\n".join(f"    {k}" for k in summarize_keys(keys))
        return "\n".join([f"Loaded {len(self.loaded)} tensors from {self.source}.",
                          block("loaded", self.loaded),
                          block("new (not in the checkpoint, initialised by the model)", self.new),
                          block("dropped (in the checkpoint, not used)", self.dropped)])


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def load_into(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, new: Sequence[str] = (),
              dropped: Optional[Sequence[str]] = None, source: str = "checkpoint") -> LoadReport:
    """Copy `state_dict` into `model` by exact name.

    new: glob patterns of model keys that may be absent from the checkpoint (e.g. 'head.*'); any other absent key is
         an error. dropped: glob patterns of checkpoint keys that may go unused; None allows any (they are reported).
    Shape mismatches are always an error, listing every mismatched key with both shapes.
    """
    model_sd = model.state_dict()
    mismatched = [f"{k}: {source} {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
                  for k, v in state_dict.items() if k in model_sd and v.shape != model_sd[k].shape]
    if mismatched:
        hint = ""
        if "cls_token" in state_dict and "cls_token" in model_sd:
            got, want = state_dict["cls_token"].shape[-1], model_sd["cls_token"].shape[-1]
            if got != want:
                hint = f" (the checkpoint is {got} wide, the model {want}: wrong model size?)"
        raise CheckpointError(f"{source} does not fit the model{hint}; mismatched shapes:\n  "
                              + "\n  ".join(mismatched))
    missing = [k for k in model_sd if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_sd]
    bad_missing = [k for k in missing if not _matches(k, new)]
    if bad_missing:
        raise CheckpointError(f"{source} lacks tensors the model needs:\n  " + "\n  ".join(summarize_keys(bad_missing)))
    if dropped is not None:
        bad_unexpected = [k for k in unexpected if not _matches(k, dropped)]
        if bad_unexpected:
            raise CheckpointError(f"{source} has tensors the model has no place for:\n  "
                                  + "\n  ".join(summarize_keys(bad_unexpected)))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in model_sd}, strict=False)
    return LoadReport(loaded=[k for k in state_dict if k in model_sd], new=missing, dropped=unexpected, source=source)


def load_whole_model(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str,
                     class_specific: Sequence[str] = (), warn: Callable[[str], None]) -> LoadReport:
    """Load a whole model (a detector, a segmentor) exactly, except that the class-specific tensors (glob patterns
    `class_specific`) of one trained for another number of classes (ADE20K's 150 -> yours: shapes differing in the
    first, class dimension alone) are left at the model's initialisation, with a warning: detectron2 and mmengine
    skip any mis-shaped tensor when fine-tuning from a whole model; here only these, the rest is refused."""
    model_sd = model.state_dict()
    afresh = [k for k, v in state_dict.items() if k in model_sd and _matches(k, class_specific)
              and v.shape != model_sd[k].shape and v.shape[1:] == model_sd[k].shape[1:]]
    if afresh:
        warn(f"{source} was trained for another number of classes: its class-specific tensors are not loaded "
             f"({', '.join(afresh)})")
    return load_into(model, {k: v for k, v in state_dict.items() if k not in afresh}, new=afresh, dropped=(),
                     source=source)
