"""Convert an MAE checkpoint into the layout another tool loads.

Reads any recognised checkpoint (the reference's mae_pretrain / _full / visualize / finetuned files, timm's .mae
weights, a HuggingFace ViTMAE directory, ours, and the detectron2 and mmseg files written here) and writes:

  mae         the reference's layout, {'model': state_dict} (.pth): encoder-only, full or fine-tuned
  timm        a state dict timm's VisionTransformer loads strictly (.safetensors, or .pth)
  hf          a directory transformers' ViTMAEForPreTraining.from_pretrained loads (config.json + model.safetensors);
              with --encoder-only a ViTMAEModel
  detectron2  {'model': ...} with the encoder under backbone.net., as our ViTDet configs load it (.pth)
  mmseg       bare mmseg MAE backbone keys, as mmseg's Pretrained init and our seg backbone load them (.pth)

    python tools/convert_checkpoint.py mae_pretrain_vit_base_full.pth vit-mae-base --to hf
    python tools/convert_checkpoint.py vit-mae-base mae_pretrain_vit_base.pth --to mae --encoder-only
    python tools/convert_checkpoint.py mae_pretrain_vit_huge.pth vit_h_p16.pth --to detectron2 --patch-size 16
    python tools/convert_checkpoint.py mae_pretrain_vit_base.pth vit_b_512.pth --to mmseg --img-size 512

It prints what it mapped, what it left out and why, and refuses (writing nothing) when the target would be
incomplete or a tensor would be lost that the target was not expected to drop. The output never overwrites a file.
"""
import argparse
import os
import sys
from typing import Iterable, List, Optional, Sequence

from mae_transfer.checkpoints import CheckpointError, read_checkpoint, summarize_keys
from mae_transfer.checkpoints.convert import TARGETS, Conversion, check_destination, convert, write


def modules(keys: Iterable[str]) -> List[str]:
    """Tensor names collapsed to modules: blocks.{0..11}.* rather than 12 x 16 names."""
    out = set()
    for key in keys:
        parts = key.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is not None:
            out.add(".".join(parts[:index + 1]) + ".*")
        elif len(parts) > 1 and parts[-1] in ("weight", "bias"):
            out.add(".".join(parts[:-1]) + ".*")
        else:
            out.add(key)
    return summarize_keys(out)


def describe_arch(ckpt) -> str:
    a = ckpt.arch()
    size = f"{a['img_size']} px" if a["img_size"] else "a non-square patch grid"
    text = f"ViT {a['embed_dim']} wide, {a['depth']} deep, patch {a['patch_size']}, {size}"
    if "decoder_embed_dim" in a:
        text += f"; decoder {a['decoder_embed_dim']} wide, {a['decoder_depth']} deep"
    return text


def report(conversion: Conversion) -> str:
    source, to = conversion.source, conversion.target.format
    params = sum(v.numel() for v in conversion.state_dict.values())
    lines = [f"read {source.path}: {source.format} format, {source.kind} checkpoint ({describe_arch(source)})"]
    lines += [f"changed {change}" for change in conversion.changes]
    if conversion.assumed:
        lines.append("assumed (not recorded in the source; edit the written config if the model differs): "
                     + ", ".join(f"{k}={v}" for k, v in conversion.assumed.items()))
    lines.append(f"mapped {len(conversion.state_dict)} tensors ({params / 1e6:.2f}M parameters) to {to}:")
    lines += [f"    {m}" for m in modules(conversion.state_dict)]
    by_reason = {}
    for key, why in conversion.dropped.items():
        by_reason.setdefault(why, []).append(key)
    if by_reason:
        lines.append(f"dropped {len(conversion.dropped)} tensors:")
        for why, keys in by_reason.items():
            lines.append(f"    {', '.join(modules(keys))}: {why}")
    else:
        lines.append("dropped nothing")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint file, or a HuggingFace ViTMAE model directory")
    parser.add_argument("dst", help="output file (a directory for --to hf); must not exist yet")
    parser.add_argument("--to", required=True, choices=list(TARGETS), help="output layout")
    parser.add_argument("--img-size", type=int, help="resize the position embeddings for this input size")
    parser.add_argument("--patch-size", type=int, help="resample the patch embedding to this patch size "
                                                       "(e.g. ViT-H/14 -> 16 for detection); keeps the image size")
    parser.add_argument("--encoder-only", action="store_true",
                        help="write the encoder alone (no decoder, no classification head)")
    args = parser.parse_args(argv)
    for flag in ("img_size", "patch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def say(text: str) -> None:
    """Print `text`; a reader that stopped reading (`| head`) does not stop the conversion."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's documented recipe: stdout to devnull, so that later prints and the final flush do not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_destination(args.to, args.dst)  # before reading a multi-GB source
        conversion = convert(read_checkpoint(args.src), args.to, img_size=args.img_size,
                             patch_size=args.patch_size, encoder_only=args.encoder_only)
        say(report(conversion))
        written = write(conversion, args.dst)
    except (CheckpointError, OSError) as e:  # OSError: a missing source, a full disk
        print(f"error: {e}\nnothing was written", file=sys.stderr)
        return 1
    say(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
