"""Starting a classifier from a pretrained encoder checkpoint (ours, the MAE reference's, timm's, or any format the
checkpoint registry recognises).

Only the encoder is taken: a decoder, and the head and fc_norm of an already fine-tuned model, are left behind.
The new head and fc_norm are the only tensors allowed to be missing, and the cls token of a checkpoint in
detectron2's ViT layout (which has none); with average pooling the checkpoint's final norm has no place in the model
(the reference drops it too) and is reported as dropped; anything else that does not fit is an error. A position
embedding pretrained at another resolution is resized bicubically first, e.g. 224 -> 448.
"""
import logging
from typing import Tuple

import torch

from ..checkpoints import CheckpointError, LoadReport, load_into, read_checkpoint
from ..models import VisionTransformer

__all__ = ["NEW_KEYS", "load_pretrained"]

NEW_KEYS = ("head.*", "fc_norm.*")
logger = logging.getLogger(__name__)


def load_pretrained(net: VisionTransformer, path) -> Tuple[LoadReport, str]:
    """Load the encoder of the checkpoint at `path` into `net`; returns the report and the checkpoint's format."""
    checkpoint = read_checkpoint(path)
    state_dict = checkpoint.encoder_state_dict()
    if "pos_embed" in state_dict:
        old = tuple(state_dict["pos_embed"].shape)
        state_dict["pos_embed"] = checkpoint.pos_embed_for(net.patch_embed.grid_size, net.num_prefix_tokens)
        if tuple(state_dict["pos_embed"].shape) != old:
            logger.info("resized pos_embed %s -> %s for input size %s", old, tuple(state_dict["pos_embed"].shape),
                        net.patch_embed.img_size)
    global_pool = not isinstance(net.fc_norm, torch.nn.Identity)
    new = list(NEW_KEYS)
    if checkpoint.format == "detectron2":  # its ViT has no cls token: a converted encoder or a ViTDet detector
        if not global_pool:
            # Refused rather than started afresh: the head would read a token pretraining never shaped (which
            # linear probing, the encoder frozen, would never train either), through a final norm they lack too.
            raise CheckpointError(f"{path} ({checkpoint.format}) holds no cls token, which this classifier pools: "
                                  f"add --global_pool (average pooling, which these checkpoints can start), or give "
                                  f"a checkpoint with a cls token (the pretraining run's encoder.safetensors)")
        new.append("cls_token")  # attended to but never pooled: it starts at the model's initialisation
    report = load_into(net, state_dict, new=new, dropped=["norm.*"] if global_pool else [], source=str(path))
    return report, checkpoint.format
