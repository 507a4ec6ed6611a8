import math

import torch
import torch.nn.functional as F

from mae_transfer.models import resize_pos_embed, sincos_pos_embed_2d


def test_sincos_values_by_hand():
    # D = 8: four channels for the column (w) index, then four for the row (h) index, each [sin, sin, cos, cos]
    # with omega = 1 / 10000^(i / 2) for i in 0, 1, i.e. omega = (1, 1/100).
    grid_h, grid_w = 2, 3
    emb = sincos_pos_embed_2d(8, (grid_h, grid_w), cls_token=True)[0]
    assert emb.shape == (1 + grid_h * grid_w, 8)
    assert torch.equal(emb[0], torch.zeros(8))
    for row in range(grid_h):
        for col in range(grid_w):
            expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                        math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
            got = emb[1 + row * grid_w + col]
            assert torch.allclose(got, torch.tensor(expected), atol=1e-6), (row, col)


def test_sincos_first_half_is_the_column():
    emb = sincos_pos_embed_2d(16, (4, 4), cls_token=False)[0].reshape(4, 4, 16)
    # Moving along a row (changing the column) changes only the first half.
    assert torch.equal(emb[2, 0, 8:], emb[2, 3, 8:])
    assert not torch.equal(emb[2, 0, :8], emb[2, 3, :8])


def test_resize_keeps_cls_and_matches_bicubic_by_hand():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    out = resize_pos_embed(pos, (6, 6))
    assert out.shape == (1, 1 + 36, 8)
    assert torch.equal(out[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], by_hand.permute(0, 2, 3, 1).reshape(1, 36, 8), atol=1e-6)
