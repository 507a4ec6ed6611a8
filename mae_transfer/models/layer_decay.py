"""Layer-wise learning-rate decay for ViT parameters, as in BEiT / the MAE fine-tuning recipe.

One definition serves every host: parameter names are matched by their canonical suffix, so 'blocks.3.attn.qkv.weight'
(timm / classification), 'backbone.net.blocks.3...' (detectron2) and 'backbone.blocks.3...' (mmseg) agree.
num_layers = depth + 1; cls_token / pos_embed / patch_embed are layer 0; block i is layer i + 1; everything else
(final norm, heads, necks, decoders, ViTDet's residual blocks) is layer num_layers.
scale = decay ** (num_layers - layer_id).
"""
import re

__all__ = ["vit_layer_id", "layer_decay_scale"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(cls_token|pos_embed|patch_embed)(?:\.|$)")


def vit_layer_id(name: str, depth: int) -> int:
    block = _BLOCK.search(name)
    # ViTDet's optional residual conv blocks are new, not pretrained: detectron2 trains them at the full lr.
    if block is not None and ".residual." not in name:
        return int(block.group(1)) + 1
    if _EMBED.search(name):
        return 0
    return depth + 1


def layer_decay_scale(name: str, depth: int, decay: float) -> float:
    return decay ** (depth + 1 - vit_layer_id(name, depth))
