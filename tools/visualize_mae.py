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
from typing import List, Sequence

import torch
from PIL import Image

from mae_transfer.checkpoints import Checkpoint, CheckpointError, load_into, read_checkpoint
from mae_transfer.data.images import list_images, whole_images
from mae_transfer.engine import exit_on_input_error, positive_int
from mae_transfer.models import MASKING_STRATEGIES, MaskedAutoencoderViT
from mae_transfer.visualization import reconstruction_picture


def build_model(ckpt: Checkpoint, norm_pix_loss: bool) -> MaskedAutoencoderViT:
    if ckpt.kind != "full":
        raise CheckpointError(
            f"{ckpt.path} holds no MAE decoder ({ckpt.kind} checkpoint), so it cannot reconstruct images; "
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
    return whole_images(files, input_size, limit)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint with the MAE decoder")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--num_images", type=positive_int, default=4, help="at most this many rows")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--masking", default="random", choices=sorted(MASKING_STRATEGIES))
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                        help="the checkpoint predicts normalised patches (default: as recorded in it, else off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    parser.add_argument("--scale", type=int, default=None, help="upscale tiles by this factor (default: to >=160px)")
    parser.add_argument("--out", default="mae_reconstructions.png")
    args = parser.parse_args(argv)
    if Path(args.out).suffix.lower() not in Image.registered_extensions():  # before the model runs, not after
        parser.error(f"--out {args.out}: no image format has that extension (e.g. .png, .jpg)")

    ckpt = read_checkpoint(args.checkpoint)
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(ckpt.meta.get("norm_pix_loss", False))
    model = build_model(ckpt, norm_pix)
    images = load_images(args.images, model.patch_embed.img_size[0], args.num_images)
    reconstruction_picture(model, images, args.mask_ratio, args.masking, args.seed, args.scale).save(args.out)
    print(f"wrote {args.out}: {len(images)} images, {ckpt.format} checkpoint {args.checkpoint}, "
          f"norm_pix_loss {norm_pix}")


if __name__ == "__main__":
    with exit_on_input_error():
        main()
