"""MAE pretraining, with the MAE reference's flags (their names and meanings), so its commands paste unchanged.

    python pretrain/main_pretrain.py --preset base-800 --data_path /datasets/imagenet --output_dir runs/base
    torchrun --nproc_per_node 8 pretrain/main_pretrain.py --preset large-1600 --data_path /datasets/imagenet ...

Writes into --output_dir: checkpoint-N.pth (resumable training state, also readable as a reference-style
checkpoint by every transfer path), log.jsonl (one JSON object per logging step and per epoch), and at the end
encoder.safetensors (the encoder in the reference's mae_pretrain_vit_*.pth key layout, loadable by timm) and
mae_full.safetensors (encoder + decoder, for visualising reconstructions). TensorBoard scalars go to --log_dir.
"""
import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from mae_transfer.checkpoints import save_checkpoint
from mae_transfer.data.images import ImageFolderDataset, WithMaskNoise, pretrain_transform
from mae_transfer.engine import (AMP_HELP, AMP_MODES, NonFiniteLossError, Precision, RunLog, adamw, cleanup,
                                 exit_on_non_finite, init_distributed, param_groups, resolve_accum_iter, resume,
                                 save_state, scaled_lr, seed_everything, train_one_epoch, warmup_cosine)
from mae_transfer.models import MASKING_STRATEGIES, MODELS, create_model, masking_noise
from presets import PRESETS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a documented recipe (see presets.py); flags given explicitly override it")
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per GPU (effective batch size is batch_size * accum_iter * #GPUs)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=None, type=int,
                        help="gradient accumulation iterations (default 1, or as --effective_batch_size needs)")
    parser.add_argument("--effective_batch_size", default=None, type=int,
                        help="choose accum_iter to reach this batch size over all GPUs (the presets use 4096)")
    parser.add_argument("--max_steps", default=None, type=int,
                        help="stop after this many optimizer steps in all (smoke runs); the schedule is unchanged")

    # Model
    parser.add_argument("--model", default="mae_vit_base_patch16", choices=sorted(n for n in MODELS
                                                                                   if n.startswith("mae_")))
    parser.add_argument("--input_size", default=224, type=int, help="image size")
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    parser.add_argument("--masking", default="random", choices=sorted(MASKING_STRATEGIES),
                        help="which patches are removed: random (the paper's default), block or grid")
    parser.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=False,
                        help="targets are the pixels of each patch normalised by their mean and std")
    parser.add_argument("--decoder_embed_dim", default=None, type=int, help="decoder width (model default: 512)")
    parser.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (model default: 8)")
    parser.add_argument("--decoder_num_heads", default=None, type=int, help="decoder heads (model default: 16)")

    # Optimizer and schedule
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: from --blr)")
    parser.add_argument("--blr", type=float, default=1e-3,
                        help="base learning rate: lr = blr * effective batch size / 256")
    parser.add_argument("--min_lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    parser.add_argument("--warmup_epochs", type=int, default=40, help="epochs of linear warmup")
    parser.add_argument("--amp", default="auto", choices=["auto", *AMP_MODES],
                        help=AMP_HELP)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (faster on GPUs)")

    # Data, output, run
    parser.add_argument("--data_path", default="./data/imagenet", type=str,
                        help="image folder (with or without class sub-folders); DATA_PATH/train is used if present")
    parser.add_argument("--output_dir", default="./output_dir", help="checkpoints, exported weights, log.jsonl")
    parser.add_argument("--log_dir", default=None, help="TensorBoard logs (default: --output_dir)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="",
                        help="training state to resume from: a checkpoint-N.pth, or a directory (its latest one)")
    parser.add_argument("--start_epoch", default=0, type=int, help="first epoch (resuming sets it)")
    parser.add_argument("--save_every", default=20, type=int, help="save a checkpoint every N epochs (and at the end)")
    parser.add_argument("--log_every", default=20, type=int, help="log every N iterations")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", default=True, help="pin loader memory (CUDA only)")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags; a --preset supplies defaults, so explicit flags always win."""
    parser = get_args_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


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


def export_weights(model, output_dir: Path, args: argparse.Namespace, epoch: int) -> None:
    """The encoder alone (reference encoder-only layout, loads into timm) and the full model with its decoder."""
    meta: Dict[str, Any] = {
        "model": args.model, "epoch": epoch, "input_size": args.input_size, "num_heads": model.blocks[0].attn.num_heads,
        "decoder_num_heads": model.decoder_blocks[0].attn.num_heads, "norm_pix_loss": args.norm_pix_loss,
        "mask_ratio": args.mask_ratio, "masking": args.masking, "pretrain_args": vars(args)}
    save_checkpoint(output_dir / "encoder.safetensors", model.encoder_state_dict(), {**meta, "kind": "encoder"})
    save_checkpoint(output_dir / "mae_full.safetensors", model.state_dict(), {**meta, "kind": "full"})


def main(args: argparse.Namespace) -> None:
    dist = init_distributed(args.device)
    device = dist.device
    say = print if dist.is_main else (lambda *a, **k: None)
    seed_everything(args.seed + dist.rank)
    try:
        accum_iter = resolve_accum_iter(args.batch_size, dist.world_size, accum_iter=args.accum_iter,
                                        effective_batch_size=args.effective_batch_size)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    output_dir = Path(args.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)

    decoder = {k: getattr(args, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
               if getattr(args, k) is not None}
    model = create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                         masking=args.masking, **decoder).to(device)

    noise_fn = partial(masking_noise, args.masking, 1, model.grid_size, args.mask_ratio)
    dataset = ImageFolderDataset(data_root(args.data_path), seed=args.seed,
                                 transform=WithMaskNoise(pretrain_transform(args.input_size), noise_fn))
    # Sharded identically for every world size, so the global batch of a step is the same set of images.
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True)
    iters_per_epoch = len(loader) // accum_iter * accum_iter
    if iters_per_epoch == 0:
        raise SystemExit(f"{dataset.root} has {len(dataset)} images: too few for one optimizer step of "
                         f"{args.batch_size} x {accum_iter} (accum_iter) x {dist.world_size} (processes)")

    effective_batch = args.batch_size * accum_iter * dist.world_size
    if args.lr is None:
        args.lr = scaled_lr(args.blr, effective_batch)
    say(f"data: {len(dataset)} images under {dataset.root}"
        + (f" ({len(dataset.classes)} class folders, labels unused)" if dataset.classes else ""))
    say(f"model: {args.model} at {args.input_size}px, mask ratio {args.mask_ratio} ({args.masking}), "
        f"norm_pix_loss {args.norm_pix_loss}")
    say(f"effective batch {effective_batch} = {args.batch_size} x {accum_iter} (accum) x {dist.world_size} "
        f"(processes); lr {args.lr:.3e} (blr {args.lr * 256 / effective_batch:.3e}); {iters_per_epoch} "
        f"iterations per epoch")

    model_without_ddp = model
    if dist.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = adamw(param_groups(model_without_ddp, args.weight_decay), args.lr, betas=(0.9, 0.95), device=device)
    precision = Precision(args.amp, device)
    scheduler = warmup_cosine(optimizer, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                              iters_per_epoch=iters_per_epoch, min_lr=args.min_lr)

    last_checkpoint, state = resume(args.resume, model=model_without_ddp, optimizer=optimizer, precision=precision)
    if state is not None:
        args.start_epoch = state["epoch"] + 1
        say(f"resumed from {last_checkpoint}: epoch {state['epoch']} done, {state['iteration']} iterations")
    elif args.resume:
        say(f"--resume {args.resume}: no checkpoint there yet; starting from scratch")

    train_model = torch.compile(model) if args.compile else model
    log = RunLog(output_dir / "log.jsonl", Path(args.log_dir or args.output_dir), enabled=dist.is_main)
    step_fn = partial(mae_step, mask_ratio=args.mask_ratio, device=device)
    max_iterations = args.max_steps * accum_iter if args.max_steps is not None else None
    epoch = args.start_epoch - 1
    start = time.perf_counter()
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        try:
            result = train_one_epoch(train_model, step_fn, loader, optimizer, scheduler, precision, epoch=epoch,
                                     iters_per_epoch=iters_per_epoch, batch_size=args.batch_size,
                                     accum_iter=accum_iter, log=log, log_every=args.log_every,
                                     max_iterations=max_iterations)
        except NonFiniteLossError as err:
            exit_on_non_finite(err, log, last_checkpoint)
        log.write("epoch", result.iteration, {"epoch": epoch, "loss": result.loss, "lr": result.lr,
                                              "images_per_s": result.images_per_s, **result.counts})
        log.flush()
        say(f"epoch {epoch}: loss {result.loss:.4f}, {result.images_per_s:.1f} images/s"
            + "".join(f", {v} {k.replace('_', ' ')}" for k, v in result.counts.items()))
        complete = result.iterations == iters_per_epoch
        if complete and (epoch % args.save_every == 0 or epoch + 1 == args.epochs or result.stopped):
            path = output_dir / f"checkpoint-{epoch}.pth"
            save_state(path, model=model_without_ddp, optimizer=optimizer, precision=precision, epoch=epoch,
                       iteration=result.iteration, args=vars(args), write=dist.is_main)
            last_checkpoint = path
        if result.stopped:
            say(f"--max_steps {args.max_steps} reached")
            break

    if dist.is_main and epoch >= args.start_epoch:
        export_weights(model_without_ddp, output_dir, args, epoch)
        say(f"done in {time.perf_counter() - start:.0f}s: {output_dir / 'encoder.safetensors'}, "
            f"{output_dir / 'mae_full.safetensors'}")
    log.close()
    cleanup()


if __name__ == "__main__":
    main(parse_args())
