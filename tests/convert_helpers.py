"""Shared by the checkpoint-tool tests: tiny MAE models, files as their authors write them, the tools as modules."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from mae_transfer.models import MaskedAutoencoderViT, mae_vit_tiny_patch16

ROOT = Path(__file__).resolve().parents[1]
# ViT-tiny's width and heads (192, 3; decoder 128 wide with 4 heads), so head counts are the standard ones, but
# 2 blocks on a 4x4 grid of 8-pixel patches: milliseconds per forward.
TINY = dict(img_size=32, patch_size=8, depth=2)


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    return mae_vit_tiny_patch16(**{**TINY, **kw}).eval()


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module, so tests call its main(argv) in-process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images with no detail finer than a quarter of their side: random 4x4 colour fields, bicubically enlarged."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic",
                         align_corners=False)


def listing(folder: Path):
    return sorted(p.name for p in folder.iterdir())
