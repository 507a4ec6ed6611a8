"""Loading segmentor checkpoints by exact names, for evaluation, --resume and `load_from`.

mmengine's Runner loads checkpoints non-strictly: a tensor that is missing, unexpected or of the wrong shape is a
logged warning, and the model goes on with whatever did not load still at its initialisation (evaluated, a wrong mIoU
printed like a right one). Here (and so in mae_transfer.seg.runner.ExactLoadingRunner, which the tools run) a
checkpoint is read safely, every tensor goes to its place or a CheckpointError names those that do not, and one report
says what was loaded. Two layouts are read:

- ours, as tools/train_seg.py saves it: ViTBackbone's encoder under 'backbone.vit.';
- mmseg's own UperNet-MAE checkpoints, as its model zoo releases them: mmseg's `MAE` backbone under 'backbone.'
  (layers.N.ln1, ffn.layers.0.0, gamma_1, ...), renamed by the 'mmseg' checkpoint format. Neck and heads are mmseg's
  modules in both, with the same names.

An encoder checkpoint (no decode head) is refused as such: it starts a segmentor as model.pretrained instead.
"""
import logging
from functools import partial
from typing import Any, Dict

import torch
from mmengine.logging import print_log
from torch import nn

from ..checkpoints import CheckpointError, LoadReport, load_whole_model, parse_checkpoint
from ..checkpoints.formats import FORMATS
from ..checkpoints.formats.mmseg import SEGMENTOR_PREFIX

__all__ = ["CLASS_SPECIFIC", "load_segmentor", "segmentor_state_dict"]

_BACKBONE = "backbone."
# The tensors whose shapes follow the class count: each decode head's final 1x1 classifier.
CLASS_SPECIFIC = ("decode_head.conv_seg.*", "auxiliary_head.conv_seg.*", "auxiliary_head.*.conv_seg.*")


def segmentor_state_dict(checkpoint: Any, source: str) -> Dict[str, torch.Tensor]:
    """The segmentor weights in a checkpoint ({'state_dict': ...} as mmengine and mmcv save them, or a bare state
    dict), named as our configs' models name them."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if isinstance(state, dict) and not any(str(k).startswith("decode_head.") for k in state) \
            and _holds_an_encoder(checkpoint, source):
        raise CheckpointError(f"{source} holds a ViT encoder, not a segmentor (no decode_head): to start a segmentor "
                              f"from it, train with model.pretrained={source} (--cfg-options model.pretrained=PATH); "
                              f"load_from and tools/test_seg.py take a whole segmentor, as train_seg.py saves it")
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{source}: not a segmentor checkpoint (expected {{'state_dict': {{name: tensor}}}}, "
                              f"as mmengine saves one, or a bare state dict)")
    mmseg = FORMATS["mmseg"]
    if mmseg.matches(state):  # mmseg's MAE backbone: its tensors under ViTBackbone's names
        encoder = mmseg.to_canonical(state)  # the backbone's part, minus the derived relative_position_index
        state = {**{k: v for k, v in state.items() if not k.startswith(_BACKBONE)},
                 **{SEGMENTOR_PREFIX + k: v for k, v in encoder.items()}}
    return state


def _holds_an_encoder(checkpoint: Any, source: str) -> bool:
    """Whether the checkpoint registry reads `checkpoint` as a ViT encoder, in any format it knows."""
    try:
        return bool(parse_checkpoint(source, checkpoint, {}).state_dict)
    except CheckpointError:
        return False


def load_segmentor(model: nn.Module, checkpoint: Any, source: str, *, new_classes: bool = False) -> LoadReport:
    """Load a segmentor checkpoint (as read_file returns it) into `model`, an mmseg EncoderDecoder built from one of
    our configs. new_classes: one trained for another number of classes (ADE20K's 150 -> yours) initialises all
    but its classifiers, which keep the model's initialisation; anything else that does not fit is refused."""
    state = segmentor_state_dict(checkpoint, source)
    return load_whole_model(model, state, source=source, class_specific=CLASS_SPECIFIC if new_classes else (),
                            warn=partial(print_log, logger="current", level=logging.WARNING))
