"""Checkpoints: safe reading, atomic writing, format detection and translation, and loading with a report."""
from pathlib import Path
from typing import Any, Dict

import torch

from .formats import FORMATS, Checkpoint, Format, detect_format, parse_checkpoint, read_checkpoint, register
from .io import (CheckpointError, atomic_directory, atomic_path, load_training_state, read_file,
                 save_training_state, save_weights, write_json)
from .load import LoadReport, load_into, load_whole_model, summarize_keys


def save_checkpoint(path, state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any] = None) -> Path:
    """Our checkpoint: canonical weights as safetensors, `meta` (model name, arch, training args...) in its header."""
    return save_weights(path, state_dict, {"format_version": 1, **(meta or {})})


__all__ = ["FORMATS", "Checkpoint", "CheckpointError", "Format", "LoadReport", "atomic_directory", "atomic_path",
           "detect_format", "load_into", "load_training_state", "load_whole_model", "parse_checkpoint",
           "read_checkpoint", "read_file", "register", "save_checkpoint", "save_training_state", "summarize_keys",
           "write_json"]
