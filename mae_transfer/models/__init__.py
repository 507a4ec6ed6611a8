"""Models: one ViT encoder (timm's, with MAE masking) and the masked autoencoder built on it."""
from typing import Callable, Dict

from torch import nn

from .mae import (DECODERS, MaskedAutoencoderViT, mae_vit_base_patch16, mae_vit_huge_patch14, mae_vit_large_patch16,
                  mae_vit_small_patch16, mae_vit_tiny_patch16)
from .layer_decay import layer_decay_scale, vit_layer_id
from .masking import MASKING_STRATEGIES, apply_masking, masking_noise
from .pos_embed import (fit_pos_embed, interpolate_patch_embed, pos_embed_grid, resample_patch_embed, resize_pos_embed,
                        sincos_pos_embed_2d)
from .vit import (ARCHS, VisionTransformer, arch_from_width, vit_base_patch16, vit_huge_patch14, vit_large_patch16,
                  vit_small_patch16, vit_tiny_patch16)

MODELS: Dict[str, Callable[..., nn.Module]] = {
    fn.__name__: fn for fn in (
        mae_vit_tiny_patch16, mae_vit_small_patch16, mae_vit_base_patch16, mae_vit_large_patch16,
        mae_vit_huge_patch14, vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16,
        vit_huge_patch14)}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by builder name, e.g. create_model('mae_vit_base_patch16', norm_pix_loss=True)."""
    try:
        return MODELS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None


__all__ = ["ARCHS", "DECODERS", "MODELS", "MASKING_STRATEGIES", "MaskedAutoencoderViT", "VisionTransformer",
           "apply_masking", "arch_from_width", "create_model", "fit_pos_embed", "interpolate_patch_embed",
           "layer_decay_scale", "masking_noise",
           "pos_embed_grid", "resample_patch_embed", "resize_pos_embed", "sincos_pos_embed_2d", "vit_layer_id",
           "mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16",
           "mae_vit_huge_patch14", "vit_tiny_patch16", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16",
           "vit_huge_patch14"]
