"""The ViTDet backbone: detectron2's own ViT (window attention, a few global blocks, decomposed relative positions,
absolute position embedding resized to the input by get_abs_pos) under its SimpleFeaturePyramid (p2-p6).

`ViT` subclasses detectron2's ViT for two reasons only:
- attention runs through F.scaled_dot_product_attention with the relative positions as an additive bias, so CUDA
  runs a fused (memory-efficient) kernel: of the (N x N) tensors of each window and global block only that bias is
  materialised (and kept for backward), where detectron2's explicit attention builds the logits, the biased logits
  and the softmax, and keeps the softmax;
- activation checkpointing uses torch.utils.checkpoint: detectron2's `use_act_checkpoint` imports fairscale, which
  is not part of our stack (and its own source says "TODO: use torch.utils.checkpoint").
Parameters, names, initialisation and results are detectron2's (tests/test_det_backbone.py compares the two).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling.backbone import vit as d2_vit
from detectron2.modeling.backbone.utils import get_abs_pos, get_rel_pos
from torch.utils.checkpoint import checkpoint

from ..models.vit import ARCHS

__all__ = ["FusedAttention", "ViT", "global_attention_blocks", "vitdet_arch"]


class FusedAttention(d2_vit.Attention):
    """detectron2's ViT attention (same parameters), computed by F.scaled_dot_product_attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._rel_pos_bias(q, (H, W)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # default scale = head_dim ** -0.5
        return self.proj(x.transpose(1, 2).reshape(B, H, W, -1))

    def _rel_pos_bias(self, q: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
        """Decomposed relative positions (MViTv2) as an attention bias (B, heads, H*W, H*W): the terms that
        detectron2's add_decomposed_rel_pos adds to the attention logits, from the unscaled queries."""
        (h, w), (B, n, _, c) = hw, q.shape
        r_q = q.reshape(B, n, h, w, c)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, n, h * w, h * w)


class ViT(d2_vit.ViT):
    """detectron2's ViTDet backbone (every argument is detectron2's) with fused attention and
    torch.utils.checkpoint activation checkpointing (`use_act_checkpoint=True` recomputes each block's activations
    in the backward pass: compute for memory, ViTDet's remedy when ViT-L/H does not fit a GPU)."""

    def __init__(self, *, use_act_checkpoint: bool = False, fused_attn: bool = True, **kwargs):
        super().__init__(**kwargs)  # without use_act_checkpoint: detectron2's would import fairscale
        self.use_act_checkpoint = use_act_checkpoint
        if fused_attn:
            for blk in self.blocks:
                blk.attn.__class__ = FusedAttention  # same module and parameters; only forward differs

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            if self.use_act_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


def global_attention_blocks(depth: int, num_global: int = 4) -> List[int]:
    """ViTDet's global-attention blocks: the last of each of `num_global` equal stages,
    2, 5, 8, 11 for 12 blocks (ViT-B); 5, 11, 17, 23 for 24 (ViT-L); 7, 15, 23, 31 for 32 (ViT-H)."""
    if depth % num_global:
        raise ValueError(f"depth {depth} does not split into {num_global} equal stages of blocks")
    return [(i + 1) * depth // num_global - 1 for i in range(num_global)]


def vitdet_arch(name: str) -> dict:
    """detectron2 ViT arguments for one of our named sizes (mae_transfer.models.ARCHS): width, depth and heads, with
    window attention in every block but ViTDet's four global ones.
    Use as `model.backbone.net.update(vitdet_arch(...))`."""
    if name not in ARCHS:
        raise ValueError(f"unknown ViT size {name!r}; available: {', '.join(ARCHS)}")
    arch = ARCHS[name]
    global_blocks = global_attention_blocks(arch["depth"])
    return dict(arch, window_block_indexes=[i for i in range(arch["depth"]) if i not in global_blocks])
