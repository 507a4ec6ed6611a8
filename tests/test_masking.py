import math

import pytest
import torch

from mae_transfer.models import apply_masking, masking, masking_noise


def test_masking_with_given_noise_follows_the_formula():
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]])
    x = torch.arange(8.0).reshape(1, 8, 1).expand(1, 8, 3)
    kept, mask, ids_restore = apply_masking(x, 0.75, noise)
    # len_keep = int(8 * 0.25) = 2: the two smallest scores, positions 1 (0.1) and 5 (0.2), in that order.
    assert kept[0, :, 0].tolist() == [1.0, 5.0]
    assert mask[0].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]
    ids_shuffle = [1, 5, 3, 7, 0, 4, 6, 2]  # argsort of the noise
    assert ids_restore[0].tolist() == [ids_shuffle.index(i) for i in range(8)]


@pytest.mark.parametrize("strategy", ["random", "block", "grid"])
def test_each_strategy_keeps_the_reference_count_exactly_the_unmasked_patches_and_masks_per_sample(strategy):
    torch.manual_seed(0)
    x = torch.randn(4, 196, 8)
    noise = masking_noise(strategy, 4, (14, 14), 0.75)
    kept, mask, _ = apply_masking(x, 0.75, noise)
    assert kept.shape == (4, 49, 8)  # int(196 * 0.25), as in the reference
    assert mask.sum(1).tolist() == [147.0] * 4
    for i in range(4):  # the encoder's tokens are those the mask calls visible
        assert sorted(map(tuple, kept[i].tolist())) == sorted(map(tuple, x[i][mask[i] == 0].tolist()))
    # random and block masking draw each sample's mask anew; grid masking is one fixed pattern
    assert len({tuple(m.tolist()) for m in mask}) == (1 if strategy == "grid" else 4)


def test_grid_masking_keeps_one_of_every_2x2():
    _, mask, _ = apply_masking(torch.randn(2, 16, 4), 0.75, masking_noise("grid", 2, (4, 4), 0.75))
    kept = (mask.reshape(2, 4, 4) == 0)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[::2, ::2] = True
    assert torch.equal(kept[0], expected) and torch.equal(kept[1], expected)


def test_grid_masking_rejects_ratios_it_cannot_express():
    with pytest.raises(ValueError, match="grid masking"):
        masking_noise("grid", 1, (14, 14), 0.6)


def _masked_neighbour_fraction(mask_grid):
    # Of the masked patches, how many have their right neighbour masked too: ~ratio for random masking,
    # much higher when masks come in blocks.
    left, right = mask_grid[:, :, :-1], mask_grid[:, :, 1:]
    return float((left * right).sum() / left.sum())


def test_block_masking_removes_blocks_not_scattered_patches():
    n, grid = 16, (14, 14)
    blocky = apply_masking(torch.randn(n, 196, 1), 0.5, masking_noise("block", n, grid, 0.5))[1].reshape(n, *grid)
    scattered = apply_masking(torch.randn(n, 196, 1), 0.5, masking_noise("random", n, grid, 0.5))[1].reshape(n, *grid)
    assert _masked_neighbour_fraction(blocky) > 0.75
    assert _masked_neighbour_fraction(scattered) < 0.6


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_blocks_never_overshoot_so_every_blocked_patch_is_removed(ratio):
    """BEiT's rule: a block may add only as many patches as the target still allows, so the blocks (scores >= 1)
    are removed whole, with no kept holes; any shortfall is made up outside them."""
    n, grid = 32, (14, 14)
    noise = masking_noise("block", n, grid, ratio)
    _, mask, _ = apply_masking(torch.randn(n, 196, 1), ratio, noise)
    blocked = noise >= 1
    target = 196 - int(196 * (1 - ratio))
    assert (blocked.sum(1) <= target).all() and (blocked.sum(1) >= target - 16).all()
    assert (mask[blocked] == 1).all()


def test_small_grids_get_blocks_too():
    """BEiT's 16-patch minimum is for 14x14 grids; on the tiny preset's 4x4 grid a block of that size never fits
    (blocks are narrower and shorter than the grid), which would make block masking random in disguise."""
    noise = masking_noise("block", 64, (4, 4), 0.75)
    blocked = (noise >= 1).sum(1)
    assert (blocked > 0).all() and blocked.float().mean() > 10  # of the 12 to mask


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="'checkerboard'"):
        masking_noise("checkerboard", 1, (4, 4), 0.75)


@pytest.mark.parametrize("length, ratio, kept", [(196, 0.9, 19), (16, 0.7, 4)])  # 19.6 -> 19, 4.8 -> 4
def test_the_kept_count_truncates_as_the_reference_does(length, ratio, kept):
    assert kept == int(length * (1 - ratio))  # models_mae.random_masking's len_keep
    x_kept, mask, _ = apply_masking(torch.randn(2, length, 3), ratio, torch.rand(2, length))
    assert x_kept.shape == (2, kept, 3)
    assert mask.sum(1).tolist() == [length - kept] * 2


def _scripted_blocks(monkeypatch, area, aspect):
    """Every block draw gives this area and aspect (_uniform draws the area, then the log aspect: a < 0)."""
    monkeypatch.setattr(masking, "_uniform", lambda a, b: math.log(aspect) if a < 0 else float(area))


def test_a_block_is_placed_only_if_narrower_and_shorter_than_the_grid(monkeypatch):
    # BEiT's MaskingGenerator: `if w < self.width and h < self.height`. On a 4x4 grid at ratio 0.75, area 12 with
    # aspect 0.75 is a 3x4 block, as wide as the grid: refused every try, so no patch is blocked (noise >= 1)...
    _scripted_blocks(monkeypatch, area=12, aspect=0.75)
    assert (masking.block_noise(8, (4, 4), 0.75) < 1).all()
    # ...while area 9 with aspect 1, a 3x3 block inside it, is placed
    _scripted_blocks(monkeypatch, area=9, aspect=1.0)
    assert ((masking.block_noise(8, (4, 4), 0.75) >= 1).sum(1) >= 9).all()
