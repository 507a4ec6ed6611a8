"""MAE pretraining, with the MAE reference's flags (their names and meanings), so its commands paste unchanged (its
submitit wrapper's own flags aside: run torchrun instead).

    python pretrain/main_pretrain.py --preset base-800 --data_path /datasets/imagenet --output_dir runs/base
    torchrun --nproc_per_node 8 pretrain/main_pretrain.py --preset large-1600 --data_path /datasets/imagenet ...

Writes into --output_dir: checkpoint-N.pth (resumable training state, also readable as a reference-style checkpoint
by every transfer path), log.jsonl (a record of what ran, then one JSON object per logging step and per epoch),
reconstructions.png (four training images as the latest checkpoint reconstructs them, the paper's Figure 2 style),
and at the end encoder.safetensors (the encoder in the reference's mae_pretrain_vit_*.pth key layout, loadable by
timm) and mae_full.safetensors (encoder + decoder, for visualising reconstructions). TensorBoard scalars, and the
reconstructions at every checkpoint, go to --log_dir.
"""
import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from mae_transfer.checkpoints import atomic_path, save_checkpoint
from mae_transfer.data.images import ImageFolderDataset, WithMaskNoise, pretrain_transform, whole_images
from mae_transfer.engine import (DistInfo, NonFiniteLossError, Precision, RunLog, adamw, add_batch_flags,
                                 add_precision_flags, add_run_flags, data_parallel, distributed_run,
                                 exit_on_input_error, exit_on_non_finite, open_run_log, param_groups, positive_int,
                                 preset_defaults, resume, save_epoch, scaled_lr, seed_everything, train_one_epoch,
                                 training_loader, warmup_cosine)
from mae_transfer.models import MASKING_STRATEGIES, MODELS, MaskedAutoencoderViT, create_model, masking_noise
from mae_transfer.visualization import reconstruction_picture
from presets import PRESETS

# What a resumed run must share with its checkpoint's run: the model and what it learns (engine.resume).
RECIPE = ("model", "input_size", "mask_ratio", "masking", "norm_pix_loss", "decoder_embed_dim", "decoder_depth",
          "decoder_num_heads")
# What runs of the MAE reference's main_pretrain.py had without a flag, and no tensor shows: random masking, and the
# 16 decoder heads of all its models (mae_vit_*_dec512d8b). Resuming one of its checkpoints compares these too.
REFERENCE_RUN = {"masking": "random", "decoder_num_heads": 16}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a documented recipe (see presets.py); flags given explicitly override it")
    parser.add_argument("--batch_size", default=64, type=positive_int,
                        help="batch size per GPU (effective batch size is batch_size * accum_iter * #GPUs)")
    parser.add_argument("--epochs", default=400, type=positive_int)
    add_batch_flags(parser)

    # Model
    parser.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(n for n in MODELS
                                                                                   if n.startswith("mae_")))
    parser.add_argument("--input_size", default=224, type=int, help="image size")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--masking", default="random", choices=sorted(MASKING_STRATEGIES),
                        help="which patches are removed: random (the paper's default), block or grid")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=False,
                        help="targets are the pixels of each patch normalised by their mean and std")
    parser.add_argument("--decoder_embed_dim", default=None, type=int,
                        help="decoder width (default: the model's, 512 for ViT-B/L/H as in the reference)")
    parser.add_argument("--decoder_depth", default=None, type=int,
                        help="decoder blocks (default: the model's, 8 for ViT-B/L/H)")
    parser.add_argument("--decoder_num_heads", default=None, type=int,
                        help="decoder heads (default: the model's, 16 for ViT-B/L/H)")

    # Optimizer and schedule
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: from --blr)")
    parser.add_argument("--blr", type=float, default=1e-3,
                        help="base learning rate: lr = blr * effective batch size / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    parser.add_argument("--warmup_epochs", type=int, default=40, help="epochs of linear warmup")
    add_precision_flags(parser)

    # Data, output, run
    parser.add_argument("--data_path", default="./data/imagenet", type=str,
                        help="image folder (with or without class sub-folders); DATA_PATH/train is used if present")
    add_run_flags(parser, outputs="checkpoints, exported weights, log.jsonl",
                  resume="training state to resume from: a checkpoint-N.pth (ours or the MAE reference's), or a "
                         "directory (its latest one)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags; a --preset supplies defaults, so explicit flags always win."""
    parser = get_args_parser()
    given = parser.parse_known_args(argv)[0]
    if given.preset is not None:
        parser.set_defaults(**preset_defaults(PRESETS[given.preset], given))
    args = parser.parse_args(argv)
    if not 0 < args.mask_ratio < 1:  # no masked patch leaves the loss 0 / 0; no visible one, nothing to encode
        parser.error(f"--mask_ratio {args.mask_ratio}: must be above 0 and below 1")
    return args


def data_root(path: str) -> Path:
    """The reference reads DATA_PATH/train; accept that layout and a plain image folder alike."""
    root = Path(path)
    return root / "train" if (root / "train").is_dir() else root


def mae_step(model: torch.nn.Module, batch, *, mask_ratio: float, device: torch.device):
    """One MAE forward: the batch's images and their (per-sample seeded) masking noise -> loss."""
    (images, noise), _, unreadable = batch
    images = images.to(device, non_blocking=True)
    noise = noise.to(device, non_blocking=True)
    loss, _, _ = model(images, mask_ratio=mask_ratio, noise=noise)
    return loss, {"unreadable_images": int(unreadable.sum())}


def preview_images(dataset: ImageFolderDataset, input_size: int, count: int = 4) -> torch.Tensor:
    """`count` readable images spread evenly over the dataset, whole (centre-cropped, not augmented): the fixed set
    whose reconstructions every checkpoint shows. A pick that cannot be read gives way to the first readable other."""
    n = len(dataset.files)
    k = min(count, n)
    spread = [i * n // k for i in range(k)]
    taken = set(spread)
    order = spread + [i for i in range(n) if i not in taken]
    return whole_images([dataset.files[i] for i in order], input_size, count)


def show_reconstructions(model: MaskedAutoencoderViT, images: torch.Tensor, args: argparse.Namespace,
                         log: RunLog, iteration: int) -> None:
    """The model's reconstructions of `images` (masks seeded, so every checkpoint masks the same patches) to
    TensorBoard and to --output_dir/reconstructions.png. A picture that cannot be drawn or written is reported and
    the run goes on: it must not end a long run, nor leave the other processes waiting for this one."""
    try:
        picture = reconstruction_picture(model, images, args.mask_ratio, args.masking, seed=args.seed)
        log.image("reconstructions", iteration, picture)
        with atomic_path(Path(args.output_dir) / "reconstructions.png") as tmp:
            picture.save(tmp, format="PNG")
    except Exception as err:
        print(f"warning: no reconstructions at step {iteration}: {type(err).__name__}: {err}", file=sys.stderr)


def export_weights(model, output_dir: Path, args: argparse.Namespace, epoch: int) -> None:
    """The encoder alone (reference encoder-only layout, loads into timm) and the full model with its decoder."""
    meta: Dict[str, Any] = {
        "model": args.model, "epoch": epoch, "input_size": args.input_size, "num_heads": model.blocks[0].attn.num_heads,
        "decoder_num_heads": model.decoder_blocks[0].attn.num_heads, "norm_pix_loss": args.norm_pix_loss,
        "mask_ratio": args.mask_ratio, "masking": args.masking, "pretrain_args": vars(args)}
    save_checkpoint(output_dir / "encoder.safetensors", model.encoder_state_dict(), {**meta, "kind": "encoder"})
    save_checkpoint(output_dir / "mae_full.safetensors", model.state_dict(), {**meta, "kind": "full"})


def main(args: argparse.Namespace) -> None:
    with distributed_run(args.device) as dist:
        pretrain(args, dist)


def pretrain(args: argparse.Namespace, dist: DistInfo) -> None:
    device = dist.device
    seed_everything(args.seed + dist.rank)
    output_dir = Path(args.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    decoder = {k: getattr(args, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
               if getattr(args, k) is not None}
    try:
        model = create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                             masking=args.masking, **decoder).to(device)
    except ValueError as err:
        raise SystemExit(f"--model {args.model} --input_size {args.input_size}: {err}") from None
    # As resolved, like --lr: the record and the checkpoints say what ran, and a resumption compares decoders, not
    # spellings of one (unset or given as the model's default).
    args.decoder_embed_dim, args.decoder_depth = model.decoder_embed.out_features, len(model.decoder_blocks)
    args.decoder_num_heads = model.decoder_blocks[0].attn.num_heads

    noise_fn = partial(masking_noise, args.masking, 1, model.grid_size, args.mask_ratio)
    dataset = ImageFolderDataset(data_root(args.data_path), seed=args.seed,
                                 transform=WithMaskNoise(pretrain_transform(args.input_size), noise_fn))
    loader, plan = training_loader(dataset, dist, batch_size=args.batch_size, seed=args.seed,
                                   num_workers=args.num_workers, pin_mem=args.pin_mem, accum_iter=args.accum_iter,
                                   effective_batch_size=args.effective_batch_size)
    if args.lr is None:
        args.lr = scaled_lr(args.blr, plan.effective)
    dist.print(f"data: {len(dataset)} images under {dataset.root}"
               + (f" ({len(dataset.classes)} class folders, labels unused)" if dataset.classes else ""))
    dist.print(f"model: {args.model} at {args.input_size}px, mask ratio {args.mask_ratio} ({args.masking}), "
               f"norm_pix_loss {args.norm_pix_loss}")
    dist.print(f"{plan}; lr {args.lr:.3e} (blr {args.lr * 256 / plan.effective:.3e}); {plan.iters_per_epoch} "
               "iterations per epoch")

    model_without_ddp, model = model, data_parallel(model, dist)
    optimizer = adamw(param_groups(model_without_ddp, args.weight_decay), args.lr, betas=(0.9, 0.95), device=device)
    precision = Precision(args.amp, device)
    scheduler = warmup_cosine(optimizer, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                              iters_per_epoch=plan.iters_per_epoch, min_lr=args.min_lr)

    last_checkpoint = resume(args, model=model_without_ddp, optimizer=optimizer, precision=precision, recipe=RECIPE,
                             unrecorded=REFERENCE_RUN)

    train_model = torch.compile(model) if args.compile else model
    log = open_run_log(args, plan, precision, dist, resumed_from=last_checkpoint)
    previews = preview_images(dataset, args.input_size).to(device) if dist.is_main else None
    step_fn = partial(mae_step, mask_ratio=args.mask_ratio, device=device)
    max_iterations = args.max_steps * plan.accum_iter if args.max_steps is not None else None
    epoch = args.start_epoch - 1
    start = time.perf_counter()
    for epoch in range(args.start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        try:
            result = train_one_epoch(train_model, step_fn, loader, optimizer, scheduler, precision, epoch=epoch,
                                     iters_per_epoch=plan.iters_per_epoch, batch_size=args.batch_size,
                                     accum_iter=plan.accum_iter, log=log, log_every=args.log_every,
                                     max_iterations=max_iterations)
        except NonFiniteLossError as err:
            exit_on_non_finite(err, log, last_checkpoint)
        log.write("epoch", result.iteration, {"epoch": epoch, "loss": result.loss, "lr": result.lr,
                                              "images_per_s": result.images_per_s, **result.counts})
        log.flush()
        dist.print(f"epoch {epoch}: loss {result.loss:.4f}, {result.images_per_s:.1f} images/s"
                   + "".join(f", {v} {k.replace('_', ' ')}" for k, v in result.counts.items()))
        saved = save_epoch(args, epoch, result, iters_per_epoch=plan.iters_per_epoch, model=model_without_ddp,
                           optimizer=optimizer, precision=precision, write=dist.is_main)
        if saved is not None:
            last_checkpoint = saved
            if dist.is_main:
                show_reconstructions(model_without_ddp, previews, args, log, result.iteration)
        if result.stopped:
            dist.print(f"--max_steps {args.max_steps} reached")
            break

    if dist.is_main and epoch >= args.start_epoch:
        export_weights(model_without_ddp, output_dir, args, epoch)
        dist.print(f"done in {time.perf_counter() - start:.0f}s: {output_dir / 'encoder.safetensors'}, "
                   f"{output_dir / 'mae_full.safetensors'}")
    log.close()


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
