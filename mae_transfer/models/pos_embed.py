"""Position embeddings: the MAE fixed 2D sin-cos table, and resizing for other resolutions / patch sizes."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d", "resize_pos_embed", "fit_pos_embed", "pos_embed_grid",
           "resample_patch_embed", "interpolate_patch_embed"]


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin | cos] with omega_i = 1 / 10000^(i / (embed_dim/2))."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """The MAE table for a (h, w) patch grid, row-major, with a zero row prepended for the cls token.

    As in the released checkpoints, the FIRST half of the channels encodes the column (w) index and the second
    half the row (h) index; swapping them silently breaks every released MAE model.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_pos_embed_1d(embed_dim // 2, cols.flatten()),
                     sincos_pos_embed_1d(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int] = None,
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize (1, prefix + h*w, D) to a new grid: prefix rows kept, the grid resized bicubically
    with align_corners=False and no antialiasing, as the MAE reference does for fine-tuning at 448."""
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=old_grid,
                                  num_prefix_tokens=num_prefix_tokens, interpolation="bicubic", antialias=False)


def pos_embed_grid(pos_embed: torch.Tensor, num_prefix_tokens: Optional[int] = None) -> Tuple[int, int]:
    """(side, prefix rows) of a (1, prefix + side*side, D) table: pretrained grids are square, and a flattened table
    does not record its grid otherwise. Without `num_prefix_tokens` the prefix is read off the row count: a cls row
    or none (n and n + 1 are never both squares for n > 0).
    Raises ValueError if the rows are not the prefix plus a square, e.g. a segmentation backbone's table for
    non-square crops (Checkpoint.pos_embed_for adds the file)."""
    rows = pos_embed.shape[1]
    prefixes = (0, 1) if num_prefix_tokens is None else (num_prefix_tokens,)
    for prefix in prefixes:
        side = math.isqrt(max(rows - prefix, 0))
        if side * side == rows - prefix:
            return side, prefix
    raise ValueError(f"pos_embed {tuple(pos_embed.shape)} is not {' or '.join(map(str, prefixes))} prefix row(s) plus "
                     f"a square grid of patches, so its grid is unknown and it cannot be resized")


def fit_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """`pos_embed` for a model with an (h, w) patch grid: itself if it has that many rows (taken as laid out for it),
    else a square pretrained grid resized bicubically (resize_pos_embed), the prefix rows kept."""
    if pos_embed.shape[1] == num_prefix_tokens + grid[0] * grid[1]:
        return pos_embed
    side, _ = pos_embed_grid(pos_embed, num_prefix_tokens)
    return resize_pos_embed(pos_embed, grid, (side, side), num_prefix_tokens=num_prefix_tokens)


def interpolate_patch_embed(weight: torch.Tensor, new_size: Sequence[int]) -> torch.Tensor:
    """ViTDet's change of patch size (its ViT-H/14 -> 16 "p14to16" weights): the (D, C, p, p) kernel interpolated
    bicubically, align_corners=False. Unlike timm's resample_patch_embed (FlexiViT's pseudo-inverse, which keeps a
    patch's output for content enlarged with it) the kernel keeps its per-pixel weights, so a patch's response grows
    by about (16/14)^2; it is what ViTDet's published numbers were fine-tuned from."""
    return F.interpolate(weight.float(), size=tuple(new_size), mode="bicubic", align_corners=False).to(weight.dtype)
