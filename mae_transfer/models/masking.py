"""Which patches the MAE encoder sees.

Every strategy is expressed as a per-sample score `noise` of shape (N, L): the `len_keep` patches with the lowest
scores are kept. This is the reference's random masking when `noise` is uniform, and it lets block-wise and
grid-wise masking (the paper's Table 1 ablation) reuse exactly the same gather / unshuffle path.
"""
import math
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["apply_masking", "random_noise", "block_noise", "grid_noise", "MASKING_STRATEGIES", "masking_noise"]


def num_kept(num_patches: int, mask_ratio: float) -> int:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def apply_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """Keep the lowest-noise patches of x (N, L, D).

    Returns (x_kept (N, len_keep, D), mask (N, L) with 1 = removed in original patch order, ids_restore (N, L)).
    """
    n, length, dim = x.shape
    if noise.shape != (n, length):
        raise ValueError(f"noise must have shape (N, L) = {(n, length)}, got {tuple(noise.shape)}")
    len_keep = num_kept(length, mask_ratio)
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def random_noise(n: int, grid: Tuple[int, int], mask_ratio: float, device=None) -> torch.Tensor:
    """Uniform scores: a uniformly random subset of patches is kept (the paper's default)."""
    return torch.rand(n, grid[0] * grid[1], device=device)


def _uniform(a: float, b: float) -> float:
    """Python's random.uniform(a, b) (a + (b - a) U, either order) drawn from torch's generator."""
    return a + (b - a) * torch.rand(1).item()


def block_noise(n: int, grid: Tuple[int, int], mask_ratio: float, device=None,
                min_block: Optional[int] = None, min_aspect: float = 0.3) -> torch.Tensor:
    """Block-wise masking, BEiT's MaskingGenerator (the paper's Table 1 uses it): rectangles of >= min_block patches
    and aspect ratio in [min_aspect, 1/min_aspect], narrower and shorter than the grid, each adding only as many new
    patches as the target still allows, until ten tries in a row add none. Blocked patches score highest, so all of
    them are removed; BEiT may fall a few patches short of the target, and those are taken at random from outside
    the blocks (ties are broken at random), which makes the kept count exact.

    min_block: BEiT's 16 patches on a 14x14 grid, scaled to the grid's area by default (a 16-patch block does not
    fit a grid smaller than 5x5, where masking would silently be random)."""
    gh, gw = grid
    if min_block is None:
        min_block = max(1, round(16 * gh * gw / (14 * 14)))
    target = gh * gw - num_kept(gh * gw, mask_ratio)
    blocked = torch.zeros(n, gh, gw, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for i in range(n):
        covered = 0
        while covered < target:
            room, added = target - covered, 0
            for _ in range(10):
                area = _uniform(min_block, room)
                aspect = math.exp(_uniform(*log_aspect))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if not (w < gw and h < gh):
                    continue
                top, left = torch.randint(0, gh - h + 1, (1,)).item(), torch.randint(0, gw - w + 1, (1,)).item()
                region = blocked[i, top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= room:
                    region.fill_(True)
                    added = new
                    break
            if not added:
                break
            covered += added
    return (blocked.flatten(1).float() + torch.rand(n, gh * gw)).to(device)


def grid_noise(n: int, grid: Tuple[int, int], mask_ratio: float, device=None) -> torch.Tensor:
    """Grid-wise masking: keep one patch of every s x s cell (s = 2 gives the paper's 75%)."""
    s = round(1.0 / math.sqrt(1.0 - mask_ratio))
    if s < 2 or abs((1.0 - mask_ratio) * s * s - 1.0) > 1e-6:
        raise ValueError(f"grid masking keeps 1 of every s*s patches; mask_ratio must be 1 - 1/s^2 "
                         f"(0.75, 0.888.., 0.9375), got {mask_ratio}")
    gh, gw = grid
    if gh % s or gw % s:
        raise ValueError(f"grid masking with s={s} needs a patch grid divisible by {s}, got {gh}x{gw}")
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    keep = ((rows % s == 0) & (cols % s == 0)).flatten()
    # A random sub-rank among kept patches makes argsort's tie order irrelevant.
    return ((~keep).float() + 0.5 * torch.rand(n, gh * gw) * keep.float()).to(device)


MASKING_STRATEGIES: Dict[str, Callable[..., torch.Tensor]] = {
    "random": random_noise, "block": block_noise, "grid": grid_noise}


def masking_noise(strategy: str, n: int, grid: Tuple[int, int], mask_ratio: float, device=None) -> torch.Tensor:
    try:
        make = MASKING_STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"unknown masking strategy {strategy!r}; choose from {sorted(MASKING_STRATEGIES)}") from None
    return make(n, grid, mask_ratio, device=device)
