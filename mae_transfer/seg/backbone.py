"""An MAE ViT encoder as an mmseg backbone: multi-level NCHW maps for UperNet, at any input size.

The encoder is mae_transfer's one ViT (timm's VisionTransformer) with what the MAE segmentation recipe adds: a
relative position bias per block (zero-initialised), layer scale and drop path. Unlike mmseg's own `MAE`, the
absolute position embedding and the relative position tables are resized at forward time (as when loading),
so training crops and whole-image inference of any size run on one model; inputs that are not a multiple of the
patch size are padded on the right and bottom (timm's dynamic_img_pad).

    model = dict(pretrained='mae_pretrain_vit_base.pth',  # mmseg passes it on to the backbone
                 backbone=dict(type='ViTBackbone', arch='base', img_size=512, drop_path_rate=0.1))
"""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch.utils.checkpoint import checkpoint

from ..checkpoints import CheckpointError, load_into, read_checkpoint
from ..checkpoints.formats import HEAD_KEYS
from ..models import ARCHS, VisionTransformer, resize_pos_embed
from ..models.mae import DECODER_KEYS
from .relative_position import RelPosBlock, resize_relative_position_table

__all__ = ["ViTBackbone", "default_out_indices"]


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Blocks whose outputs feed the pyramid: after 1/3, 1/2, 2/3 and all of the depth, as BEiT and MAE pick them
    ([3, 5, 7, 11] for 12 blocks, [7, 11, 15, 23] for 24)."""
    return depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1


@MODELS.register_module()
class ViTBackbone(BaseModule):
    """ViT encoder returning the token maps of `out_indices` blocks as (B, C, H/p, W/p) tensors.

    (Not named 'MAE...': mmseg's own LayerDecayOptimizerConstructor picks its rule by backbone class name and would
    match none of these parameter names, silently giving no decay; with this name it refuses. Use
    LayerDecayOptimWrapperConstructor.)

    Args:
        arch: a named size of mae_transfer.models.ARCHS ('tiny', 'small', 'base', 'large', 'huge'); embed_dim,
            depth and num_heads in `vit_kwargs` override it.
        img_size: the training crop size: the grid of the position embedding and of the relative position tables
            (any other size is resized to at forward time).
        out_indices: blocks to output; default `default_out_indices(depth)`.
        init_values: layer-scale init (1.0 in the MAE ADE20K recipe; None for no layer scale).
        with_cp: gradient checkpointing of each block while training.
        pretrained / init_cfg=dict(type='Pretrained', checkpoint=PATH): an encoder checkpoint in any format
            mae_transfer.checkpoints reads (ours, the MAE reference's, timm, mmseg's MAE), loaded in init_weights
            with a report of loaded / new / dropped tensors.
        vit_kwargs: any other argument of timm's VisionTransformer (attn_drop_rate, mlp_ratio, ...).
    """

    def __init__(self, arch: str = "base", img_size: Union[int, Sequence[int]] = 512, patch_size: int = 16,
                 out_indices: Optional[Sequence[int]] = None, drop_path_rate: float = 0.1,
                 init_values: Optional[float] = 1.0, with_cp: bool = False, pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None, **vit_kwargs):
        if pretrained is not None:  # mmseg's EncoderDecoder(pretrained=...) convention
            if init_cfg is not None:
                raise ValueError(f"the checkpoint is given twice: pretrained={pretrained!r} (model.pretrained) and "
                                 f"init_cfg={init_cfg!r}; give one (the seg_configs, like mmseg's MAE configs, use "
                                 "model.pretrained=PATH)")
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.vit = VisionTransformer(
            **{**ARCHS[arch], **vit_kwargs}, img_size=img_size, patch_size=patch_size, global_pool="",
            final_norm=False, drop_path_rate=drop_path_rate, init_values=init_values, dynamic_img_size=True,
            dynamic_img_pad=True, block_fn=partial(RelPosBlock, window_size=grid))
        self.embed_dim = self.vit.embed_dim
        self.depth = len(self.vit.blocks)
        self.out_indices = tuple(default_out_indices(self.depth) if out_indices is None else out_indices)
        if not all(-self.depth <= i < self.depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} out of range for {self.depth} blocks")
        self.out_indices = tuple(i % self.depth for i in self.out_indices)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        vit = self.vit
        x = vit.patch_embed(x)  # (B, h, w, C): dynamic_img_size keeps the grid
        batch, h, w, channels = x.shape
        # The position embedding resized as load_encoder resizes it (no antialiasing, as the MAE reference and mmseg),
        # not as timm's dynamic_img_size does (antialiased: another bicubic kernel), so running this model at a size
        # equals loading its weights into a model built for that size.
        pos_embed = resize_pos_embed(vit.pos_embed, (h, w), vit.patch_embed.grid_size,
                                     num_prefix_tokens=vit.num_prefix_tokens)
        x = torch.cat([vit.cls_token.expand(batch, -1, -1), x.flatten(1, 2)], dim=1) + pos_embed
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        outs = []
        for i, block in enumerate(vit.blocks):
            if self.with_cp and self.training:
                x = checkpoint(block, x, (h, w), use_reentrant=False)
            else:
                x = block(x, (h, w))
            if i in self.out_indices:
                tokens = x[:, vit.num_prefix_tokens:]
                outs.append(tokens.transpose(1, 2).reshape(batch, channels, h, w))
        return tuple(outs)

    def init_weights(self) -> None:
        """Load the encoder checkpoint of init_cfg=dict(type='Pretrained', ...); without one, keep timm's init."""
        if self.init_cfg is not None:
            if not (isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained"):
                raise ValueError(f"ViTBackbone takes init_cfg=dict(type='Pretrained', checkpoint=PATH) or None, "
                                 f"got {self.init_cfg}")
            print_log(str(self.load_encoder(self.init_cfg["checkpoint"])), logger="current")
        self._is_init = True

    def load_encoder(self, path):
        """Load an encoder checkpoint of any known format; the position embedding and relative position tables are
        resized to this model's grid. Returns the LoadReport (new: what MAE does not pretrain, such as relative
        position tables and layer scale, and the cls token of a checkpoint in detectron2's ViT layout, which has
        none; dropped: the final norm, decoder and classifier)."""
        ckpt = read_checkpoint(path)
        arch = ckpt.arch()
        ours = dict(embed_dim=self.embed_dim, depth=self.depth, patch_size=self.vit.patch_embed.patch_size[0])
        theirs = {k: arch[k] for k in ours}
        if theirs != ours:
            raise CheckpointError(f"{path}: the checkpoint is a ViT with {theirs}, the backbone {ours}: "
                                  f"choose the backbone's arch / patch_size to match the checkpoint")
        state_dict = dict(ckpt.state_dict)
        grid = self.vit.patch_embed.grid_size
        state_dict["pos_embed"] = ckpt.pos_embed_for(grid, self.vit.num_prefix_tokens)
        for name, table in state_dict.items():
            if name.endswith("rel_pos_bias.table"):
                trained_on = _table_grid(table, grid, where=f"{path}: {name}")
                state_dict[name] = resize_relative_position_table(table, trained_on, grid)
        new = ["blocks.*.rel_pos_bias.table", "blocks.*.ls?.gamma"]
        if ckpt.format == "detectron2":  # its ViT has no cls token (a converted encoder, a ViTDet detector): ours
            new.append("cls_token")      # starts at its initialisation, an attention slot no head reads
        return load_into(self.vit, state_dict, new=new,
                         dropped=["norm.*", *(k + "*" for k in DECODER_KEYS + HEAD_KEYS)], source=str(path))


def _table_grid(table: torch.Tensor, grid: Sequence[int], where: str) -> Tuple[int, int]:
    """The grid a checkpoint's relative position table was trained on: `grid` if the table fits it, else square."""
    offsets = table.shape[0] - 3
    if offsets == (2 * grid[0] - 1) * (2 * grid[1] - 1):
        return tuple(grid)
    side = (round(offsets ** 0.5) + 1) // 2
    if (2 * side - 1) ** 2 != offsets:
        raise CheckpointError(f"{where}: a relative position table of {table.shape[0]} rows fits neither the "
                              f"backbone's {grid[0]}x{grid[1]} grid nor any square one")
    return side, side
