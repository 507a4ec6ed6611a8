"""MAE reconstructions as a PNG grid in the style of the paper's Figure 2.

One row per image: the original, the masked input the encoder sees, the decoder's reconstruction, and the
reconstruction with the visible patches pasted back.

    python tools/visualize_mae.py --checkpoint output_dir/mae_full.safetensors --images photos/ --out recon.png
    python tools/visualize_mae.py --checkpoint mae_visualize_vit_large.pth --images a.jpg b.jpg --masking block

Needs a checkpoint with the decoder: ours (mae_full.safetensors, checkpoint-N.pth) or the reference's
mae_visualize_vit_* (trained on plain pixels: the clearest pictures) and mae_pretrain_vit_*_full (trained on
normalised pixels: pass --norm_pix_loss so each patch's prediction is mapped back with the original's statistics).
Encoder-only checkpoints cannot reconstruct anything.
"""
import argparse
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from mae_transfer.checkpoints import Checkpoint, CheckpointError, load_into, read_checkpoint
from mae_transfer.data.images import list_images, to_rgb
from mae_transfer.models import MASKING_STRATEGIES, MaskedAutoencoderViT, masking_noise

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")


def build_model(ckpt: Checkpoint, norm_pix_loss: bool) -> MaskedAutoencoderViT:
    if ckpt.kind != "full":
        raise CheckpointError(
            f"{ckpt.path} is an {ckpt.kind} checkpoint without the MAE decoder, so it cannot reconstruct images; "
            "use mae_full.safetensors or checkpoint-N.pth from pretraining, or the reference's "
            "mae_visualize_vit_*.pth / mae_pretrain_vit_*_full.pth")
    arch = ckpt.arch()
    # Head counts shape no tensor, so a wrong one would load silently and reconstruct garbage: refuse to guess.
    if arch["num_heads"] is None or ckpt.decoder_num_heads is None:
        raise CheckpointError(f"{ckpt.path}: encoder width {arch['embed_dim']} / decoder width "
                              f"{arch['decoder_embed_dim']} is no known MAE size and the file records no num_heads / "
                              "decoder_num_heads")
    model = MaskedAutoencoderViT(
        img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"],
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
        decoder_embed_dim=arch["decoder_embed_dim"], decoder_depth=arch["decoder_depth"],
        decoder_num_heads=ckpt.decoder_num_heads,
        norm_pix_loss=norm_pix_loss)
    load_into(model, ckpt.state_dict, dropped=(), source=str(ckpt.path))
    return model.eval()


def load_images(paths: Sequence[Path], input_size: int, limit: int) -> torch.Tensor:
    files: List[Path] = []
    for path in map(Path, paths):
        files += list_images(path)[0] if path.is_dir() else [path]
    if not files:
        raise SystemExit("no images given")
    prepare = transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    images = []
    for f in files[:limit]:
        with Image.open(f) as img:
            images.append(prepare(to_rgb(img)))
    return torch.stack(images)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, masking: str,
                seed: int = 0) -> Dict[str, np.ndarray]:
    """The four panels of each image as uint8 arrays (N, H, W, 3), keyed by COLUMNS."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    noise = masking_noise(masking, len(images), model.grid_size, mask_ratio)
    torch.set_rng_state(generator_state)
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
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


def make_grid(panels: Dict[str, np.ndarray], titles: Sequence[str], scale: int, pad: int = 4,
              header: int = 18) -> Image.Image:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with the MAE decoder")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--num_images", type=int, default=4, help="at most this many rows")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--masking", default="random", choices=sorted(MASKING_STRATEGIES))
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="the checkpoint predicts normalised patches (default: as recorded in it, else off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--scale", type=int, default=None, help="upscale tiles by this factor (default: to >=160px)")
    parser.add_argument("--out", default="mae_reconstructions.png")
    args = parser.parse_args(argv)

    ckpt = read_checkpoint(args.checkpoint)
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(ckpt.meta.get("norm_pix_loss", False))
    model = build_model(ckpt, norm_pix)
    images = load_images(args.images, model.patch_embed.img_size[0], args.num_images)
    panels = reconstruct(model, images, args.mask_ratio, args.masking, args.seed)
    scale = args.scale or max(1, -(-160 // images.shape[-1]))
    titles = [COLUMNS[0], f"masked {args.mask_ratio:.0%} ({args.masking})", COLUMNS[2], COLUMNS[3]]
    make_grid(panels, titles, scale).save(args.out)
    print(f"wrote {args.out}: {len(images)} images, {ckpt.format} checkpoint {args.checkpoint}, "
          f"norm_pix_loss {norm_pix}")


if __name__ == "__main__":
    main()
