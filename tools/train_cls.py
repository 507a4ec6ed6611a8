r"""Classification transfer of an MAE encoder: end-to-end fine-tuning, linear probing, partial fine-tuning.

Flags are the MAE reference's (main_finetune.py / main_linprobe.py), so its commands paste unchanged (its submitit
wrappers' own flags aside: run torchrun instead), plus --mode, --partial_blocks, --dataset and --preset:

    python tools/train_cls.py --preset finetune-base --finetune mae_pretrain_vit_base.pth \
        --dataset inat2018 --data_path /datasets/inat2018 --output_dir runs/inat18_base
    torchrun --nproc_per_node 8 tools/train_cls.py --preset linprobe-large --finetune mae_pretrain_vit_large.pth \
        --data_path /datasets/imagenet --dist_eval
    python tools/train_cls.py --eval --resume runs/inat18_base --dataset inat2018 --data_path /datasets/inat2018

Writes into --output_dir: checkpoint-N.pth (resumable training state), log.jsonl (a record of what ran, logging
steps, and per epoch the training loss and validation top-1 / top-5 / loss), metrics.json (the final and best
validation metrics) and classifier.safetensors (the trained model); --eval writes eval.json, building the model the
checkpoint records (--model, --mode, --partial_blocks, --input_size, pooling) unless flags say otherwise.
TensorBoard scalars go to --log_dir.
"""
import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, SequentialSampler, Subset

from mae_transfer.checkpoints import CheckpointError, load_into, read_checkpoint, save_checkpoint, write_json
from mae_transfer.cls import (ENCODERS, MODES, MODE_DEFAULTS, OPTIMIZERS, PRESETS, build_classifier, build_optimizer,
                              evaluate, load_pretrained, resolve_mode)
from mae_transfer.data.classification import DATASETS, build_dataset, classification_transform
from mae_transfer.models import ARCHS, arch_from_width
from mae_transfer.engine import (DistInfo, NonFiniteLossError, Precision, add_batch_flags, add_precision_flags,
                                 add_run_flags, data_parallel, distributed_run, exit_on_input_error,
                                 exit_on_non_finite, latest_checkpoint, open_run_log, positive_int, preset_defaults,
                                 resume, save_epoch, scaled_lr, seed_everything, train_one_epoch, training_loader,
                                 warmup_cosine)

# What a resumed run must share with its checkpoint's run: the model and its task (engine.resume).
RECIPE = ("model", "input_size", "nb_classes", "mode", "partial_blocks", "global_pool", "dataset")
# What builds the classifier a checkpoint holds; --eval takes them from the checkpoint unless given.
CLASSIFIER = ("model", "mode", "global_pool", "input_size", "partial_blocks")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE classification transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    by_mode = "(default: by --mode, as the reference's main_finetune.py / main_linprobe.py)"
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a documented recipe (mae_transfer/cls/presets.py); explicit flags override it")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="finetune (all parameters), linprobe (frozen encoder, BN + linear head, LARS) or "
                             "partial (last --partial_blocks blocks + norm + head); default finetune")
    parser.add_argument("--partial_blocks", type=int, default=0,
                        help="blocks tuned by --mode partial, counted from the last (0 = linear probing)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help=f"batch size per GPU; effective batch = batch_size * accum_iter * #GPUs {by_mode}")
    parser.add_argument("--epochs", type=positive_int, default=None, help=by_mode)
    add_batch_flags(parser)

    # Model
    parser.add_argument("--model", default="vit_large_patch16", choices=ENCODERS, help="encoder architecture")
    parser.add_argument("--input_size", type=int, default=224, help="image size (pos_embed is resized to it)")
    parser.add_argument("--drop_path", type=float, default=None, help=f"drop path rate {by_mode}")
    parser.add_argument("--global_pool", action="store_true", default=None,
                        help="average-pool the patch tokens, then fc_norm (the fine-tuning default)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the normalised cls token instead (the linear-probing default)")

    # Optimizer and schedule
    parser.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm (default: no)")
    parser.add_argument("--weight_decay", type=float, default=None, help=by_mode)
    parser.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: from --blr)")
    parser.add_argument("--blr", type=float, default=None,
                        help=f"base learning rate: lr = blr * effective batch size / 256 {by_mode}")
    parser.add_argument("--layer_decay", type=float, default=None, help=f"layer-wise lr decay {by_mode}")
    parser.add_argument("--min_lr", type=float, default=None, help=f"lr at the end of the cosine {by_mode}")
    parser.add_argument("--warmup_epochs", type=int, default=None, help=by_mode)
    add_precision_flags(parser)

    # Augmentation (timm's implementations)
    parser.add_argument("--color_jitter", type=float, default=None, help="colour jitter (used only without --aa)")
    parser.add_argument("--aa", type=str, default=None,
                        help=f"timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1; 'none' for none {by_mode}")
    parser.add_argument("--smoothing", type=float, default=None, help=f"label smoothing {by_mode}")
    parser.add_argument("--reprob", type=float, default=None, help=f"random erasing probability {by_mode}")
    parser.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    parser.add_argument("--recount", type=int, default=1, help="random erasing count")
    parser.add_argument("--resplit", action="store_true",
                        help="a no-op, accepted so the reference's commands paste: it concerns timm's augmentation "
                             "splits, which the reference's main_finetune.py does not use either")
    parser.add_argument("--mixup", type=float, default=None, help=f"mixup alpha, on if > 0 {by_mode}")
    parser.add_argument("--cutmix", type=float, default=None, help=f"cutmix alpha, on if > 0 {by_mode}")
    parser.add_argument("--cutmix_minmax", type=float, nargs=2, default=None,
                        help="cutmix min/max area ratio; overrides alpha and turns cutmix on")
    parser.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    parser.add_argument("--mixup_switch_prob", type=float, default=0.5,
                        help="probability of cutmix instead of mixup when both are on")
    parser.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])

    # Data, checkpoints, run
    parser.add_argument("--finetune", default="", help="pretrained checkpoint to start from (any recognised format)")
    parser.add_argument("--dataset", default="imagefolder", choices=sorted(DATASETS),
                        help="layout of --data_path (see mae_transfer/data/classification.py)")
    parser.add_argument("--data_path", default="./data/imagenet", type=str, help="dataset root")
    parser.add_argument("--nb_classes", type=int, default=None,
                        help="number of classes (default: the dataset's; if given, it must match)")
    add_run_flags(parser, outputs="checkpoints, metrics, log.jsonl",
                  resume="training state to resume (a checkpoint-N.pth or a directory: its latest); with --eval "
                         "any checkpoint of the whole classifier")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate the --resume checkpoint only, built as it records (--model, --mode, "
                             "--partial_blocks, --input_size, pooling) or its tensors show, unless those flags are "
                             "given")
    parser.add_argument("--dist_eval", action="store_true",
                        help="split evaluation over all processes (exact: no sample is repeated)")
    return parser


def recorded_classifier(resume: str) -> Dict[str, Any]:
    """The settings that build the classifier `resume` names (a file, or a directory's latest checkpoint-N.pth), as
    it records them: our classifier.safetensors in its metadata, a training checkpoint in its flags. Where nothing
    records them (the reference's mae_finetuned_*.pth), its tensors say the model, input size, pooling (fc_norm is
    average pooling's) and a linear probe (its BatchNorm head)."""
    path = latest_checkpoint(Path(resume))
    if path is None:
        return {}
    checkpoint = read_checkpoint(path)
    recorded = {k: checkpoint.meta[k] for k in CLASSIFIER if checkpoint.meta.get(k) is not None}  # ours, or flags
    arch = checkpoint.arch()
    size = arch_from_width(arch["embed_dim"])
    model = f"vit_{size}_patch{arch['patch_size']}"
    if model in ENCODERS and ARCHS[size]["depth"] == arch["depth"]:
        recorded.setdefault("model", model)
    if arch["img_size"] is not None:
        recorded.setdefault("input_size", arch["img_size"])
    recorded.setdefault("global_pool", "fc_norm.weight" in checkpoint.state_dict)
    if checkpoint.kind == "linprobe":
        recorded.setdefault("mode", "linprobe")
    return recorded


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags. Defaults come from the protocol (--mode), then a --preset over them; explicit flags win. With
    --eval, the settings that build the classifier default to what its checkpoint recorded."""
    parser = get_args_parser()
    known = parser.parse_known_args(argv)[0]
    recorded: Dict[str, Any] = {}
    if known.eval and known.resume:
        try:
            recorded = recorded_classifier(known.resume)
        except (CheckpointError, OSError) as err:
            parser.error(f"--resume {known.resume}: {err}")
        parser.set_defaults(**recorded)
        known = parser.parse_known_args(argv)[0]
    preset = PRESETS[known.preset] if known.preset else {}
    mode = known.mode or preset.get("mode", "finetune")
    parser.set_defaults(**MODE_DEFAULTS[resolve_mode(mode, known.partial_blocks)])
    parser.set_defaults(**{**preset_defaults(preset, known), **recorded, "mode": mode})
    args = parser.parse_args(argv)
    if args.aa is not None and args.aa.lower() == "none":
        args.aa = None
    return args


def classification_step(model: torch.nn.Module, batch, *, criterion, mixup: Optional[Mixup],
                        device: torch.device):
    images, targets, unreadable = batch
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if mixup is not None:
        images, targets = mixup(images, targets)
    return criterion(model(images), targets), {"unreadable_images": int(unreadable.sum())}


def build_mixup(args: argparse.Namespace, num_classes: int) -> Optional[Mixup]:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise SystemExit(f"mixup/cutmix pair up the images of a batch: --batch_size {args.batch_size} must be even")
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_criterion(args: argparse.Namespace, mixup: Optional[Mixup]) -> torch.nn.Module:
    if mixup is not None:  # targets are soft (mixed, and smoothed by Mixup itself)
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def update_best(best: Dict[str, Any], metrics: Dict[str, Any], epoch: int) -> Dict[str, Any]:
    """The best validation metrics so far: the highest top-1, the earliest epoch among equals."""
    return {**metrics, "epoch": epoch} if not best or metrics["top1"] > best["top1"] else best


def best_before(log_path: Path, start_epoch: int) -> Dict[str, Any]:
    """The best validation metrics of the epochs before `start_epoch`, from the epoch records of the run's log, so
    that a resumed run's metrics.json covers the whole run. An epoch logged twice (run again after resuming from an
    older checkpoint) counts by its last record; a run killed mid-write can leave a broken line, which is skipped."""
    if not log_path.is_file():
        return {}
    logged: Dict[int, Dict[str, Any]] = {}
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "epoch" and record["epoch"] < start_epoch:
            logged[record["epoch"]] = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
    best: Dict[str, Any] = {}
    for epoch in sorted(logged):
        best = update_best(best, logged[epoch], epoch)
    return best


def unreadable_note(metrics: Dict[str, Any]) -> str:
    count = metrics["unreadable_images"]
    return f" ({count} unreadable val image(s), each counted as the next readable one)" if count else ""


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or with --eval, evaluate); returns the final validation metrics."""
    if args.eval and not args.resume:
        raise SystemExit("--eval needs --resume: the classifier checkpoint to evaluate")
    with distributed_run(args.device) as dist:
        return transfer(args, dist)


def transfer(args: argparse.Namespace, dist: DistInfo) -> Dict[str, Any]:
    """Build the data and the model, then train or evaluate (--eval)."""
    device = dist.device
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, format="%(message)s")
    seed_everything(args.seed + dist.rank)
    mode = resolve_mode(args.mode, args.partial_blocks)
    if dist.is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # Data
    val_set = build_dataset(args.dataset, args.data_path, "val", classification_transform(False, args.input_size))
    train_set = None
    if not args.eval:
        train_set = build_dataset(args.dataset, args.data_path, "train", seed=args.seed, transform=(
            classification_transform(True, args.input_size, auto_augment=args.aa, color_jitter=args.color_jitter,
                                     re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)))
        if train_set.classes != val_set.classes:
            raise SystemExit(f"{args.data_path}: the train and val splits have different classes "
                             f"({len(train_set.classes)} vs {len(val_set.classes)})")
    num_classes = len(val_set.classes)
    if args.nb_classes is not None and args.nb_classes != num_classes:
        raise SystemExit(f"--nb_classes {args.nb_classes} but {args.dataset} at {args.data_path} has {num_classes}")
    args.nb_classes = num_classes
    # Without --dist_eval the main process evaluates the whole set; with it, each process a disjoint shard (no
    # padding, unlike DistributedSampler), so the summed counts are exactly the whole set's.
    if args.dist_eval:
        val_set = Subset(val_set, range(dist.rank, len(val_set), dist.world_size))
    val_loader = DataLoader(val_set, sampler=SequentialSampler(val_set), batch_size=args.batch_size,
                            num_workers=args.num_workers, pin_memory=args.pin_mem and device.type == "cuda")

    # Model
    net = build_classifier(args.model, num_classes, mode=mode, global_pool=args.global_pool,
                           drop_path=args.drop_path, img_size=args.input_size, partial_blocks=args.partial_blocks)
    dist.print(f"model: {args.model} at {args.input_size}px, {mode}"
               + (f" of the last {args.partial_blocks} blocks" if mode == "partial" else "")
               + f", {'global pool + fc_norm' if args.global_pool else 'cls token'}, {num_classes} classes; "
                 f"{sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")
    if args.finetune and not args.eval:
        report, fmt = load_pretrained(net, args.finetune)
        dist.print(f"{report}\n(format: {fmt})")
    net.to(device)
    precision = Precision(args.amp, device)

    if args.eval:
        return evaluate_checkpoint(args, net, val_loader, precision, dist)
    return train(args, net, train_set, val_loader, precision, dist)


def evaluate_checkpoint(args: argparse.Namespace, net: torch.nn.Module, val_loader: DataLoader,
                        precision: Precision, dist: DistInfo) -> Dict[str, Any]:
    """--eval: the whole classifier from --resume (any recognised checkpoint), evaluated; eval.json written."""
    path = latest_checkpoint(Path(args.resume))
    if path is None:
        raise SystemExit(f"--resume {args.resume}: no checkpoint-N.pth in that directory")
    dist.print(load_into(net, read_checkpoint(path).state_dict, dropped=[], source=str(path)))
    metrics = evaluate(net, val_loader, precision, sharded=args.dist_eval, show_progress=dist.is_main)
    if dist.is_main:
        output = Path(args.output_dir) / "eval.json"
        write_json(output, {**metrics, "checkpoint": str(path), "dataset": args.dataset, "data_path": args.data_path})
        dist.print(f"{path} on {metrics['images']} {args.dataset} val images: top-1 {metrics['top1']:.2f}%, "
                   f"top-5 {metrics['top5']:.2f}%, loss {metrics['loss']:.4f}{unreadable_note(metrics)} -> {output}")
    return metrics


def train(args: argparse.Namespace, net: torch.nn.Module, train_set, val_loader: DataLoader, precision: Precision,
          dist: DistInfo) -> Dict[str, Any]:
    """Train from the model as built and loaded (or resume), evaluating after every epoch."""
    device, mode, output_dir = dist.device, resolve_mode(args.mode, args.partial_blocks), Path(args.output_dir)
    num_classes = args.nb_classes
    train_loader, plan = training_loader(train_set, dist, batch_size=args.batch_size, seed=args.seed,
                                         num_workers=args.num_workers, pin_mem=args.pin_mem, accum_iter=args.accum_iter,
                                         effective_batch_size=args.effective_batch_size)
    if args.lr is None:
        args.lr = scaled_lr(args.blr, plan.effective)
    dist.print(f"data: {args.dataset} at {args.data_path}: {len(train_set)} train / {len(val_loader.dataset)} val "
               "images"
               + (" (this process's share: --dist_eval)" if args.dist_eval and dist.world_size > 1 else ""))
    dist.print(f"{plan}; {OPTIMIZERS[mode]} lr {args.lr:.3e} (blr {args.lr * 256 / plan.effective:.3e}), "
               f"weight decay {args.weight_decay}"
               + (f", layer decay {args.layer_decay}" if OPTIMIZERS[mode] == "adamw" else "")
               + f"; {plan.iters_per_epoch} iterations per epoch")

    model_without_ddp, model = net, data_parallel(net, dist)
    optimizer = build_optimizer(net, mode, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                                partial_blocks=args.partial_blocks, device=device)
    scheduler = warmup_cosine(optimizer, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                              iters_per_epoch=plan.iters_per_epoch, min_lr=args.min_lr)
    mixup = build_mixup(args, num_classes)
    step_fn = partial(classification_step, criterion=build_criterion(args, mixup), mixup=mixup, device=device)

    last_checkpoint = resume(args, model=model_without_ddp, optimizer=optimizer, precision=precision, recipe=RECIPE)

    train_model = torch.compile(model) if args.compile else model
    log = open_run_log(args, plan, precision, dist, resumed_from=last_checkpoint)
    max_iterations = args.max_steps * plan.accum_iter if args.max_steps is not None else None
    best: Dict[str, Any] = {}
    if last_checkpoint is not None and dist.is_main:  # the log beside a checkpoint is the run's that wrote it
        best = best_before(last_checkpoint.parent / "log.jsonl", args.start_epoch)
    metrics: Dict[str, Any] = {}
    epoch = args.start_epoch - 1
    start = time.perf_counter()
    for epoch in range(args.start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        try:
            result = train_one_epoch(train_model, step_fn, train_loader, optimizer, scheduler, precision,
                                     epoch=epoch, iters_per_epoch=plan.iters_per_epoch,
                                     batch_size=args.batch_size,
                                     accum_iter=plan.accum_iter, log=log, log_every=args.log_every,
                                     max_iterations=max_iterations, clip_grad=args.clip_grad)
        except NonFiniteLossError as err:
            exit_on_non_finite(err, log, last_checkpoint)
        # Without --dist_eval every process evaluates the whole set, as in the reference: processes left waiting at
        # the next collective while one evaluates a large model on a large set could meet the collectives' timeout.
        metrics = evaluate(model_without_ddp, val_loader, precision, sharded=args.dist_eval,
                           show_progress=dist.is_main)
        if dist.is_main:
            best = update_best(best, metrics, epoch)
            log.write("epoch", result.iteration, {"epoch": epoch, "train_loss": result.loss, "lr": result.lr,
                                                  "images_per_s": result.images_per_s, **result.counts,
                                                  **{f"val_{k}": v for k, v in metrics.items()}})
            log.flush()
            dist.print(f"epoch {epoch}: train loss {result.loss:.4f}, val top-1 {metrics['top1']:.2f}% "
                       f"top-5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}{unreadable_note(metrics)} "
                       f"(best top-1 {best['top1']:.2f}%), {result.images_per_s:.1f} images/s"
                       + "".join(f", {v} {k.replace('_', ' ')}" for k, v in result.counts.items() if v))
        last_checkpoint = save_epoch(args, epoch, result, iters_per_epoch=plan.iters_per_epoch,
                                     model=model_without_ddp, optimizer=optimizer, precision=precision,
                                     write=dist.is_main) or last_checkpoint
        if result.stopped:
            dist.print(f"--max_steps {args.max_steps} reached")
            break

    if dist.is_main and epoch >= args.start_epoch:
        meta = {"model": args.model, "mode": mode, "partial_blocks": args.partial_blocks,
                "global_pool": args.global_pool, "input_size": args.input_size, "num_classes": num_classes,
                "num_heads": model_without_ddp.blocks[0].attn.num_heads, "dataset": args.dataset, "epoch": epoch,
                "metrics": metrics, "finetune_args": vars(args)}
        save_checkpoint(output_dir / "classifier.safetensors", model_without_ddp.state_dict(), meta)
        write_json(output_dir / "metrics.json", {"final": {**metrics, "epoch": epoch}, "best": best,
                                                 "chance_top1": 100 / num_classes})
        dist.print(f"done in {time.perf_counter() - start:.0f}s: final top-1 {metrics['top1']:.2f}% "
                   f"(best {best['top1']:.2f}% at epoch {best['epoch']}); {output_dir / 'classifier.safetensors'}, "
                   f"{output_dir / 'metrics.json'}")
    log.close()
    return metrics


if __name__ == "__main__":
    with exit_on_input_error():
        main(parse_args())
