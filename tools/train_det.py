#!/usr/bin/env python
r"""Train or evaluate Mask R-CNN with an MAE ViT backbone (ViTDet) in detectron2, from a LazyConfig in det_configs/.

detectron2's conventions (those of its tools/lazyconfig_train_net.py): --config-file, --num-gpus, --num-machines,
--machine-rank, --dist-url, --resume, --eval-only, then key=value overrides of the config. On a machine without
a GPU, --num-gpus N runs N CPU processes over gloo (with train.device=cpu), as detectron2's launch does.

    python tools/train_det.py --config-file det_configs/mask_rcnn_vit_base_100ep.py --num-gpus 8 \
        train.init_checkpoint=runs/base-800/encoder.safetensors train.output_dir=runs/det_vit_base
    python tools/train_det.py --config-file det_configs/mask_rcnn_vit_base_100ep.py --num-gpus 8 --resume \
        train.output_dir=runs/det_vit_base                     # continue from runs/det_vit_base/last_checkpoint
    python tools/train_det.py --config-file det_configs/mask_rcnn_vit_base_100ep.py --eval-only \
        train.init_checkpoint=runs/det_vit_base/model_final.pth      # or --resume train.output_dir=runs/det_vit_base

Differences from detectron2's script: weights load by exact names with one report (mae_transfer.det.ViTDetCheckpointer),
checkpoints are written atomically, AMP is used only where it exists (CUDA), gradient compression
(train.ddp.fp16_compression) is bf16's unless training in fp16 (no loss scale would keep small gradients in fp16's
range), --eval-only takes --resume (the run's last checkpoint) and refuses an encoder-only checkpoint (its heads
would be untrained), a test set of other categories than the model's is refused before training or evaluating, and
every evaluation prints one box/mask AP table and writes it to <train.output_dir>/coco_ap.json.
"""
import logging
from typing import Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers,
                               hooks, launch)
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks
from torch.nn.parallel import DistributedDataParallel

from mae_transfer.det import ViTDetCheckpointer, check_num_classes, evaluate

logger = logging.getLogger("detectron2")

_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device(cfg, num_gpus: int) -> None:
    """train.device against the machine and --num-gpus. Without a GPU, detectron2's launch joins --num-gpus CPU
    processes over gloo (how the tests run a distributed detector); with one, over NCCL, one GPU per process."""
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={cfg.train.device} but PyTorch sees no CUDA GPU: add train.device=cpu")
    if num_gpus > 1 and not cfg.train.device.startswith("cuda") and torch.cuda.is_available():
        raise ValueError(f"--num-gpus {num_gpus} with train.device={cfg.train.device}: on a machine with GPUs "
                         f"detectron2's launch runs one GPU per process; add train.device=cuda")


def amp_dtype(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of train.amp (train.amp.precision: float16, the default, or bfloat16), or None to train in
    float32: AMP off, or not on CUDA (AMPTrainer is CUDA-only, and CPUs here gain nothing from autocast)."""
    if not cfg.train.amp.enabled:
        return None
    if not cfg.train.device.startswith("cuda"):
        logger.warning(f"train.amp.enabled has no effect on {cfg.train.device}: training in float32")
        return None
    name = cfg.train.amp.get("precision", "float16")
    if name not in _AMP_DTYPES:
        raise ValueError(f"train.amp.precision={name!r}: choose one of {', '.join(_AMP_DTYPES)}")
    return _AMP_DTYPES[name]


def build_trainer(model, data_loader, optimizer, precision: Optional[torch.dtype]) -> SimpleTrainer:
    """detectron2's AMPTrainer under autocast (fp16 with loss scaling), else its float32 SimpleTrainer."""
    if precision is None:
        return SimpleTrainer(model, data_loader, optimizer)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)  # bfloat16 needs no loss scaling
    return AMPTrainer(model, data_loader, optimizer, precision=precision, grad_scaler=scaler)


def create_ddp(model, ddp_options, precision: Optional[torch.dtype]):
    """detectron2's create_ddp_model, except that its fp16 gradient compression (train.ddp.fp16_compression) is
    bf16's unless training in fp16: without fp16 AMP's loss scale, gradients below fp16's range (~6e-8, reached sooner
    after the average over processes) would arrive as zeros. bf16 keeps float32's range."""
    options = dict(ddp_options)
    if next(model.parameters()).device.type == "cpu":  # detectron2 would give DDP the local rank as a GPU id
        options.setdefault("device_ids", None)
    bf16_compression = False
    if precision != torch.float16:
        bf16_compression = options.pop("fp16_compression", False)
    model = create_ddp_model(model, **options)
    if bf16_compression and isinstance(model, DistributedDataParallel):
        model.register_comm_hook(state=None, hook=comm_hooks.bf16_compress_hook)
    return model


def check_test_set(cfg) -> None:
    """The model's class count against the test set's categories, before any training or inference: detectron2's
    COCOEvaluator would only assert after a whole inference (or score a model of other classes)."""
    dataset = cfg.dataloader.test.dataset
    if "name" in dataset:  # datasets given by paths (mae_transfer.det.coco_instances), registered as they are read
        instantiate(dataset)
        check_num_classes(dataset.name, cfg.model.roi_heads.num_classes, split="test")


def do_train(args, cfg) -> None:
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    if "name" in cfg.dataloader.train.dataset:  # datasets given by paths (mae_transfer.det.coco_instances)
        check_num_classes(cfg.dataloader.train.dataset.name, cfg.model.roi_heads.num_classes)
    check_test_set(cfg)  # evaluated at the end of training at least

    precision = amp_dtype(cfg)
    model = create_ddp(model, cfg.train.ddp, precision)
    trainer = build_trainer(model, train_loader, optimizer, precision)
    checkpointer = ViTDetCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    # Training may start from a detector of other classes; a resumed run keeps its own.
    checkpointer.new_classes = not (args.resume and checkpointer.has_checkpoint())
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        # Iterations done: trainer.iter is the one just run, or max_iter once training has finished.
        hooks.EvalHook(cfg.train.eval_period,
                       lambda: evaluate(cfg, model, iteration=min(trainer.iter + 1, cfg.train.max_iter))),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that had just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    check_device(cfg, args.num_gpus * args.num_machines)
    default_setup(cfg, args)
    # default_setup sets up detectron2's and fvcore's loggers only: without this, our modules' messages (the AP table,
    # the checkpointer's notes on resized embeddings) would reach neither the console nor log.txt.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="mae_transfer")
    if args.eval_only:
        check_test_set(cfg)
        model = create_ddp(instantiate(cfg.model).to(cfg.train.device), {}, precision=None)  # no gradients
        checkpointer = ViTDetCheckpointer(model, cfg.train.output_dir)
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)  # --resume: the run's last
        if checkpointer.loaded is None or checkpointer.loaded_encoder:
            if checkpointer.loaded:
                what = f"{checkpointer.loaded} holds an encoder only: its heads would be untrained"
            elif args.resume:  # detectron2's resume_or_load falls back to train.init_checkpoint, empty here
                what = f"--resume found no last_checkpoint in {cfg.train.output_dir} (train.output_dir)"
            else:
                what = "no checkpoint was given"
            raise ValueError(f"--eval-only evaluates a trained detector, but {what}. Give train.init_checkpoint=<a "
                             f"detector, e.g. OUTPUT_DIR/model_final.pth>, or --resume with train.output_dir=<the "
                             f"output directory of a run>")
        return evaluate(cfg, model, checkpoint=checkpointer.loaded)
    do_train(args, cfg)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
