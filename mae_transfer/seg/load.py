"""Loading a trained segmentor for evaluation, by exact names.

mmseg's test tool (mmengine's Runner, through `load_from`) loads a checkpoint non-strictly: a tensor that is missing,
unexpected or of the wrong shape is a logged warning, and the model is evaluated with whatever did not load still at
its initialisation: a wrong mIoU, printed like a right one. Here every tensor must find its place. Two layouts are read:

- ours, as tools/train_seg.py saves it: ViTBackbone's encoder under 'backbone.vit.';
- mmseg's own UperNet-MAE checkpoints, as its model zoo releases them: mmseg's `MAE` backbone under 'backbone.'
  (layers.N.ln1, ffn.layers.0.0, gamma_1, ...), renamed by the 'mmseg' checkpoint format. Neck and heads are mmseg's
  modules in both, with the same names.
"""
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ..checkpoints import CheckpointError, LoadReport, load_into, read_file
from ..checkpoints.formats import FORMATS

__all__ = ["load_segmentor", "segmentor_state_dict"]

_BACKBONE, _ENCODER = "backbone.", "backbone.vit."


def segmentor_state_dict(obj, path) -> Dict[str, torch.Tensor]:
    """The segmentor weights in what read_file(path) returned ({'state_dict': ...} as mmengine and mmcv save them, or
    a bare state dict), named as our configs' models name them."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path}: not a segmentor checkpoint (expected {{'state_dict': {{name: tensor}}}}, as "
                              f"mmengine saves one, or a bare state dict)")
    mmseg = FORMATS["mmseg"]
    if mmseg.matches(state):  # mmseg's MAE backbone: its tensors under ViTBackbone's names
        encoder = mmseg.to_canonical(state)  # the backbone's part, minus the derived relative_position_index
        state = {**{k: v for k, v in state.items() if not k.startswith(_BACKBONE)},
                 **{_ENCODER + k: v for k, v in encoder.items()}}
    return state


def load_segmentor(model: nn.Module, path) -> LoadReport:
    """Load the trained segmentor at `path` into `model` (an mmseg EncoderDecoder built from one of our configs).
    A checkpoint that does not fit is a CheckpointError naming every tensor that does not."""
    obj, _ = read_file(path)
    return load_into(model, segmentor_state_dict(obj, path), new=(), dropped=(), source=str(Path(path)))
