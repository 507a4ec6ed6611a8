"""The one ViT encoder of mae-transfer: timm's VisionTransformer, plus MAE's encoding of a visible subset.

Parameter names are timm's, which are also the MAE reference's (cls_token, pos_embed, patch_embed.proj,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so released encoders load with no renaming and
everything timm offers (SDPA attention, drop path, layer scale, grad checkpointing, pooling heads, pretrained-weight
filters) comes for free. Pretraining, classification and the segmentation backbone all build on this class.
"""
from functools import partial
from typing import Callable, Dict, Optional

import torch
from torch import nn
from timm.models import vision_transformer as timm_vit

from .masking import apply_masking, masking_noise

__all__ = ["VisionTransformer", "ARCHS", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16",
           "vit_large_patch16", "vit_huge_patch14", "arch_from_width"]

# The reference sizes (B/L/H) plus two that train on a laptop CPU.
ARCHS: Dict[str, dict] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def arch_from_width(embed_dim: int) -> Optional[str]:
    """The named size with this width (widths are unique across ARCHS), or None."""
    return next((name for name, a in ARCHS.items() if a["embed_dim"] == embed_dim), None)


class VisionTransformer(timm_vit.VisionTransformer):
    """timm's ViT with the MAE defaults (LayerNorm eps 1e-6, qkv bias, cls token, no head unless asked).

    `forward_features` / `forward` run on all tokens exactly as timm does; `forward_masked` runs on a visible
    subset of patches, as the MAE encoder does during pretraining.
    """

    def __init__(self, *, num_classes: int = 0, global_pool: str = "token", **kwargs):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(num_classes=num_classes, global_pool=global_pool, **kwargs)

    @property
    def grid_size(self):
        return self.patch_embed.grid_size

    def forward_masked(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None,
                       masking: str = "random"):
        """Encode only the patches that survive masking.

        `noise` (N, L) fixes which patches are kept (lowest first); without it one is drawn by `masking`.
        Returns (latent (N, 1 + len_keep, D) with the cls token first, mask (N, L) 1 = removed, ids_restore (N, L)).
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, self.num_prefix_tokens:]
        if noise is None:
            noise = masking_noise(masking, x.shape[0], self.grid_size, mask_ratio, device=x.device)
        x, mask, ids_restore = apply_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = timm_vit.checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x), mask, ids_restore


def _builder(arch: str, patch_size: int) -> Callable[..., VisionTransformer]:
    def build(**kwargs) -> VisionTransformer:
        return VisionTransformer(**{**ARCHS[arch], "patch_size": patch_size, **kwargs})

    build.__name__ = f"vit_{arch}_patch{patch_size}"
    build.__doc__ = f"ViT-{arch} /{patch_size} encoder ({ARCHS[arch]}); kwargs override any timm argument."
    return build


vit_tiny_patch16 = _builder("tiny", 16)
vit_small_patch16 = _builder("small", 16)
vit_base_patch16 = _builder("base", 16)
vit_large_patch16 = _builder("large", 16)
vit_huge_patch14 = _builder("huge", 14)
