"""The 'detectron2' format: a ViT encoder as the backbone of a ViTDet detector (detectron2.modeling.ViT wrapped in a
SimpleFeaturePyramid, so the encoder's tensors live under 'backbone.net.').

detectron2's ViT keeps the encoder's names below that prefix (patch_embed.proj, pos_embed, blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}) with two differences:
- it has no cls token: with pretrain_use_cls_token=True its pos_embed keeps the cls row, (1, 1 + h*w, D) exactly as
  the checkpoint has it, and drops that row at forward; cls_token itself has no place;
- it has no final norm: the pyramid reads the last block's output, so norm.* has no place either.
Its relative position tables (blocks.N.attn.rel_pos_{h,w}) and the conv blocks of its residual_block_indexes
(blocks.N.residual.*) are ViTDet's own, absent from any encoder checkpoint.
"""
from typing import Dict, Mapping, Optional

import torch

from . import Format, register

PREFIX = "backbone.net."
# Encoder tensors that exist in detectron2's ViT under PREFIX with the same name.
_VIT_KEYS = ("patch_embed.", "pos_embed", "blocks.")
_DETECTOR_ONLY = (".attn.rel_pos_h", ".attn.rel_pos_w", ".residual.")


def detectron2_name(key: str) -> Optional[str]:
    """The name of canonical encoder tensor `key` in a ViTDet model, or None where detectron2's ViT has no place
    for it (cls_token, the final norm, a decoder or a classifier head)."""
    return PREFIX + key if key.startswith(_VIT_KEYS) else None


def from_canonical(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: v for k, v in sd.items() if (name := detectron2_name(k)) is not None}


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The plain-ViT part of a detectron2 checkpoint (a trained ViTDet, say); pyramid, heads, relative positions
    and residual conv blocks are detector parts with no canonical name."""
    return {k[len(PREFIX):]: v for k, v in sd.items()
            if k.startswith(PREFIX) and k[len(PREFIX):].startswith(_VIT_KEYS)
            and not any(part in k for part in _DETECTOR_ONLY)}


def _matches(keys: Mapping[str, object]) -> bool:
    return PREFIX + "patch_embed.proj.weight" in keys and PREFIX + "blocks.0.attn.qkv.weight" in keys


register(Format("detectron2", "detectron2 ViTDet model ({'model': state_dict}, ViT under 'backbone.net.')",
                _matches, to_canonical, from_canonical))
