import math

import pytest
import torch
import torch.nn.functional as F

from mae_transfer.models import fit_pos_embed, pos_embed_grid, resize_pos_embed, sincos_pos_embed_2d


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


def test_grid_and_prefix_read_off_the_row_count():
    # 14 x 14 patches (ViT-B/16 at 224) with and without the cls row; 7 x 7 told 1 prefix.
    assert pos_embed_grid(torch.zeros(1, 197, 8)) == (14, 1)
    assert pos_embed_grid(torch.zeros(1, 196, 8)) == (14, 0)
    assert pos_embed_grid(torch.zeros(1, 50, 8), num_prefix_tokens=1) == (7, 1)
    # A cls row over 32 x 64 patches (512 x 1024 crops) is no square grid: not 45 x 45 under 24 "prefix" rows.
    with pytest.raises(ValueError, match=r"pos_embed \(1, 2049, 8\) is not 0 or 1 prefix row\(s\) plus a square"):
        pos_embed_grid(torch.zeros(1, 1 + 32 * 64, 8))
    with pytest.raises(ValueError, match=r"pos_embed \(1, 196, 8\) is not 1 prefix row\(s\) plus a square"):
        pos_embed_grid(torch.zeros(1, 196, 8), num_prefix_tokens=1)


def test_fit_keeps_a_table_of_the_grid_and_resizes_another():
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert fit_pos_embed(pos, (4, 4)) is pos
    assert fit_pos_embed(pos, (2, 8)) is pos  # as many rows: a flattened table does not say its grid
    torch.testing.assert_close(fit_pos_embed(pos, (6, 5)), resize_pos_embed(pos, (6, 5), (4, 4)), rtol=0, atol=0)
    grid_only = pos[:, 1:]
    torch.testing.assert_close(fit_pos_embed(grid_only, (6, 6), num_prefix_tokens=0),
                               resize_pos_embed(pos, (6, 6))[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="is not 1 prefix row"):
        fit_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))  # 3 x 4 patches: no square to resize from
