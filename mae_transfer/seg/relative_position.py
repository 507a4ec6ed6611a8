"""BEiT's relative position bias, as MAE uses it for segmentation, at any token grid.

Each block learns one bias per head for every 2-D offset between two patches of its (Wh, Ww) training grid, plus
three entries for cls->patch, patch->cls and cls->cls, and adds the looked-up (heads, N, N) bias to its attention
logits. The table starts at zero, so a pretrained encoder starts out computing exactly what it was pretrained to.

mmseg's `MAE` backbone fixes the grid when it is built (and resizes tables only when loading a checkpoint, through
scipy's removed `interp2d`). Here the table is resized at forward time to the grid of the input (bicubic over the
offset plane, like the absolute position embedding), so one model runs on any input size; at the training size the
table is used as is.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models.vision_transformer import Block

__all__ = ["RelativePositionBias", "RelPosBlock", "resize_relative_position_table"]

_NUM_CLS_ENTRIES = 3  # cls->patch, patch->cls, cls->cls: the last rows of the table, independent of the grid


def _num_offsets(grid: Sequence[int]) -> Tuple[int, int]:
    return 2 * grid[0] - 1, 2 * grid[1] - 1


def resize_relative_position_table(table: torch.Tensor, old_grid: Sequence[int],
                                   new_grid: Sequence[int]) -> torch.Tensor:
    """Resize a ((2h-1)(2w-1) + 3, heads) table laid out for `old_grid` to one for `new_grid`.

    The plane of offsets is resized bicubically (align_corners=False maps the zero offset onto the zero offset);
    the three cls entries are kept. Differentiable, so it runs inside the forward pass.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return table
    heads = table.shape[1]
    expected = _num_offsets(old_grid)[0] * _num_offsets(old_grid)[1] + _NUM_CLS_ENTRIES
    if table.shape[0] != expected:
        raise ValueError(f"relative position table has {table.shape[0]} rows; a {old_grid[0]}x{old_grid[1]} grid "
                         f"needs {expected}")
    offsets, cls_entries = table[:-_NUM_CLS_ENTRIES], table[-_NUM_CLS_ENTRIES:]
    plane = offsets.t().reshape(1, heads, *_num_offsets(old_grid))
    plane = F.interpolate(plane.float(), size=_num_offsets(new_grid), mode="bicubic", align_corners=False)
    return torch.cat([plane.reshape(heads, -1).t().to(table.dtype), cls_entries])


class RelativePositionBias(nn.Module):
    """A block's learned relative position bias: `table` holds the bias of each offset on the `window_size` grid;
    calling it with the token grid of an input returns the (heads, N, N) additive attention bias, N = 1 + h * w."""

    def __init__(self, window_size: Sequence[int], num_heads: int):
        super().__init__()
        self.window_size = tuple(window_size)
        rows = _num_offsets(self.window_size)[0] * _num_offsets(self.window_size)[1] + _NUM_CLS_ENTRIES
        self.table = nn.Parameter(torch.zeros(rows, num_heads))
        # The lookup for the training grid, reused every step; other grids build theirs on the fly.
        self.register_buffer("index", gen_relative_position_index(self.window_size, class_token=True),
                             persistent=False)

    def forward(self, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        grid = self.window_size if grid is None else tuple(grid)
        if grid == self.window_size:
            table, index = self.table, self.index
        else:
            table = resize_relative_position_table(self.table, self.window_size, grid)
            index = gen_relative_position_index(grid, class_token=True, device=table.device)
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class RelPosBlock(Block):
    """timm's ViT Block whose attention adds a relative position bias, passed to timm's (SDPA) attention as its
    additive `attn_mask`. Every other part (qkv, layer scale, drop path, MLP) is timm's, so parameter names stay
    the encoder's and MAE checkpoints load unchanged; the bias adds `rel_pos_bias.table`.

    Built by timm's VisionTransformer through `block_fn=partial(RelPosBlock, window_size=grid)`.
    """

    def __init__(self, dim: int, num_heads: int, *, window_size: Sequence[int], **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.rel_pos_bias = RelativePositionBias(window_size, num_heads)

    def forward(self, x: torch.Tensor, grid: Optional[Sequence[int]] = None) -> torch.Tensor:
        """x: (B, 1 + h * w, C), the cls token first; grid: (h, w), the training grid when None."""
        bias = self.rel_pos_bias(grid)
        if bias.shape[-1] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens do not fit a {tuple(grid or self.rel_pos_bias.window_size)} grid "
                             f"with a cls token; pass the grid of the input")
        return super().forward(x, attn_mask=bias.unsqueeze(0))
