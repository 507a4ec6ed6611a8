"""Segmentation layouts: mmseg's `MAE` backbone (BEiT-style) key names, and our own segmentors.

On disk this is what mmseg itself loads as a pretrained backbone (`init_cfg=dict(type='Pretrained', checkpoint=...)`
or `pretrained=` in its configs, as its tools/model_converters write them): bare backbone keys, no container.
Reading also accepts the same keys under {'state_dict': ...} and with the segmentor's 'backbone.' prefix (an mmseg
UperNet-MAE state dict), of which only the backbone is kept.

    canonical (reference / timm)          mmseg MAE
    patch_embed.proj.*                    patch_embed.projection.*
    blocks.N.norm1.* / norm2.*            layers.N.ln1.* / ln2.*
    blocks.N.attn.qkv.* / attn.proj.*     layers.N.attn.qkv.* / attn.proj.*
    blocks.N.mlp.fc1.* / mlp.fc2.*        layers.N.ffn.layers.0.0.* / ffn.layers.1.*
    blocks.N.ls1.gamma / ls2.gamma        layers.N.gamma_1 / gamma_2               (layer scale)
    blocks.N.rel_pos_bias.table           layers.N.attn.relative_position_bias_table
    norm.*                                ln1.*                                    (final norm, when present)
    cls_token, pos_embed                  the same

mmseg's `layers.N.attn.relative_position_index` is derived from the grid, so it is not carried over. Decoder and
classifier tensors have no place in a backbone checkpoint and are not written.

Our segmentors ('mae_transfer_seg': tools/train_seg.py's iter_N.pth, {'state_dict': ..., 'meta': ...}) hold the
encoder of mae_transfer.seg.ViTBackbone under 'backbone.vit.' with the canonical names above, relative position
tables and layer scale included; neck and heads, like an mmseg segmentor's, are set aside.
"""
import re
from typing import Any, Dict, Mapping

import torch

from . import Format, HEAD_KEYS, register
from ...models.mae import DECODER_KEYS

StateDict = Dict[str, torch.Tensor]

_PREFIX = "backbone."
SEGMENTOR_PREFIX = _PREFIX + "vit."  # ViTBackbone's encoder in our segmentors
_TOP = {"patch_embed.proj.": "patch_embed.projection.", "norm.": "ln1."}
_BLOCK = {"norm1.": "ln1.", "norm2.": "ln2.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1.",
          "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2", "rel_pos_bias.table": "attn.relative_position_bias_table"}
_TOP_INVERSE = {new: old for old, new in _TOP.items()}
_BLOCK_INVERSE = {new: old for old, new in _BLOCK.items()}
_CANONICAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")
_MMSEG_BLOCK = re.compile(r"layers\.(\d+)\.(.*)")


def _rename(rest: str, table: Mapping[str, str]) -> str:
    """Replace the first matching prefix; names no entry covers (attn.qkv, cls_token, ...) are the same in both."""
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def to_canonical(sd: StateDict) -> StateDict:
    if any(k.startswith(_PREFIX) for k in sd):  # a whole segmentor: keep its backbone
        sd = {k[len(_PREFIX):]: v for k, v in sd.items() if k.startswith(_PREFIX)}
    out = {}
    for key, value in sd.items():
        block = _MMSEG_BLOCK.fullmatch(key)
        if block is not None:
            if block.group(2) == "attn.relative_position_index":
                continue
            out[f"blocks.{block.group(1)}.{_rename(block.group(2), _BLOCK_INVERSE)}"] = value
        else:
            out[_rename(key, _TOP_INVERSE)] = value
    return out


def from_canonical(sd: StateDict) -> StateDict:
    out = {}
    for key, value in sd.items():
        if key.startswith(DECODER_KEYS + HEAD_KEYS):
            continue
        block = _CANONICAL_BLOCK.fullmatch(key)
        if block is not None:
            out[f"layers.{block.group(1)}.{_rename(block.group(2), _BLOCK)}"] = value
        else:
            out[_rename(key, _TOP)] = value
    return out


def matches(sd: Mapping[str, Any]) -> bool:
    return any(k.endswith("patch_embed.projection.weight") for k in sd) and any(
        re.fullmatch(r"(backbone\.)?layers\.0\.attn\.qkv\.weight", k) for k in sd)


register(Format("mmseg", "mmseg MAE backbone: bare backbone keys (layers.N.ln1, ffn.layers.0.0, ...) as mmseg loads "
                         "pretrained backbones; reads {'state_dict': ...} and 'backbone.'-prefixed segmentors too",
                matches, to_canonical, from_canonical))


def _segmentor_to_canonical(sd: StateDict) -> StateDict:
    return {k[len(SEGMENTOR_PREFIX):]: v for k, v in sd.items() if k.startswith(SEGMENTOR_PREFIX)}


def _is_segmentor(sd: Mapping[str, Any]) -> bool:
    return (SEGMENTOR_PREFIX + "patch_embed.proj.weight" in sd
            and SEGMENTOR_PREFIX + "blocks.0.attn.qkv.weight" in sd)


# Read only: an encoder alone makes no segmentor, so no conversion writes this layout.
register(Format("mae_transfer_seg", "segmentor written by tools/train_seg.py ({'state_dict': ...}, ViTBackbone's "
                                    "encoder under 'backbone.vit.'); neck and heads set aside",
                _is_segmentor, _segmentor_to_canonical))
