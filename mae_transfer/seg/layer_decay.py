"""Layer-wise learning-rate decay for ViTBackbone segmentors, as an mmengine optimizer-wrapper constructor.

mmseg's own LayerDecayOptimizerConstructor recognises only its BEiT/MAE parameter names ('backbone.layers.N'), so this
one applies mae_transfer's single layer-decay rule (mae_transfer.models.layer_decay) instead; it gives every parameter
the lr and weight decay mmseg's gives its MAE (tests/test_seg_layer_decay.py checks it). Everything else is
mmengine's DefaultOptimWrapperConstructor, so its paramwise options (flat_decay_mult, custom_keys, ...) still apply and
the layer-decay scale multiplies whatever learning rate they give a parameter.

    optim_wrapper = dict(type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
                         optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
                         paramwise_cfg=dict(layer_decay_rate=0.65, flat_decay_mult=0.0))
"""
from typing import List

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from ..models.layer_decay import layer_decay_scale, vit_layer_id

__all__ = ["LayerDecayOptimWrapperConstructor"]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """paramwise_cfg: layer_decay_rate (required) plus any of mmengine's. The depth is the backbone's (`depth`)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict = None):
        if not paramwise_cfg or "layer_decay_rate" not in paramwise_cfg:
            raise ValueError("LayerDecayOptimWrapperConstructor needs paramwise_cfg=dict(layer_decay_rate=...)")
        # Left in paramwise_cfg (mmengine ignores keys it does not know), which keeps the per-parameter path on.
        self.layer_decay_rate = float(paramwise_cfg["layer_decay_rate"])
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = "", **kwargs) -> None:
        super().add_params(params, module, prefix, **kwargs)
        if prefix:  # mmengine recurses through every submodule; scale once, from the top
            return
        depth = getattr(getattr(module, "backbone", None), "depth", None)
        if depth is None:
            raise TypeError(f"{type(module).__name__} has no ViT backbone with a `depth` (a ViTBackbone): layer decay "
                            f"does not apply to it")
        names = {id(p): name for name, p in module.named_parameters()}
        layers = {}
        for group in params:
            name = names[id(group["params"][0])]
            scale = layer_decay_scale(name, depth, self.layer_decay_rate)
            group["lr"] = group.get("lr", self.base_lr) * scale
            layers.setdefault(vit_layer_id(name, depth), scale)
        print_log(f"layer decay {self.layer_decay_rate} over {depth} blocks: lr scale per layer "
                  + ", ".join(f"{layer}: {scale:.3g}" for layer, scale in sorted(layers.items())), logger="current")
