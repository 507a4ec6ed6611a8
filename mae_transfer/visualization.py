"""Pictures of what an MAE makes of an image, as the paper's Figure 2 shows it: the original, the masked input the
encoder sees, the decoder's reconstruction, and the reconstruction with the visible patches pasted back. Used by
tools/visualize_mae.py and by pretraining, which logs them at every checkpoint."""
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .models import MaskedAutoencoderViT, masking_noise

__all__ = ["COLUMNS", "reconstruct", "reconstruction_grid", "reconstruction_picture"]

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, masking: str,
                seed: int = 0) -> Dict[str, np.ndarray]:
    """The four panels of each of `images` (ImageNet-normalised, on the model's device) as uint8 arrays
    (N, H, W, 3), keyed by COLUMNS. The masks come from `seed` alone and no generator of the caller's moves, so a
    training run that looks at its reconstructions trains exactly as one that does not."""
    with torch.random.fork_rng(devices=[]):  # the masks are drawn on the CPU, from the seed (CPU generator only)
        torch.default_generator.manual_seed(seed)
        noise = masking_noise(masking, len(images), model.grid_size, mask_ratio)
    training = model.training
    model.eval()
    try:
        _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise.to(images.device))
    finally:
        model.train(training)
    images, pred, mask = images.float().cpu(), pred.float().cpu(), mask.float().cpu()
    if model.norm_pix_loss:  # predictions are normalised patches: restore each patch's own mean and variance
        target = model.patchify(images)
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    recon = model.unpatchify(pred)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 on removed pixels
    panels = {COLUMNS[0]: images, COLUMNS[1]: images * (1 - removed), COLUMNS[2]: recon,
              COLUMNS[3]: images * (1 - removed) + recon * removed}
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return {k: ((v * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
            for k, v in panels.items()}


def reconstruction_grid(panels: Dict[str, np.ndarray], titles: Sequence[str] = COLUMNS, scale: int = 1,
                        pad: int = 4, header: int = 18) -> Image.Image:
    """`reconstruct`'s panels as one picture: a column per panel under its title, a row per image, each tile
    upscaled `scale` times (nearest neighbour: patches stay sharp)."""
    n, h, w, _ = panels[COLUMNS[0]].shape
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new("RGB", (len(COLUMNS) * (cell_w + pad) + pad, header + n * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, (key, title) in enumerate(zip(COLUMNS, titles)):
        x = pad + c * (cell_w + pad)
        draw.text((x, 3), title, fill="black")
        for r in range(n):
            tile = Image.fromarray(panels[key][r]).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (x, header + pad + r * (cell_h + pad)))
    return grid


def reconstruction_picture(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, masking: str,
                           seed: int = 0, scale: Optional[int] = None) -> Image.Image:
    """`reconstruct` then `reconstruction_grid`, the masking named in its column's title; tiles upscaled to at least
    160 px unless `scale` says otherwise."""
    panels = reconstruct(model, images, mask_ratio, masking, seed)
    titles = [COLUMNS[0], f"masked {mask_ratio:.0%} ({masking})", COLUMNS[2], COLUMNS[3]]
    return reconstruction_grid(panels, titles, scale or max(1, -(-160 // images.shape[-1])))
