r"""Train a segmentor from an mmseg config (mmseg's tools/train.py conventions, mmengine's Runner and launcher).

    python tools/train_seg.py seg_configs/upernet_mae_vit_base_ade20k_512x512_160k.py --amp \
        --data-root data/ade/ADEChallengeData2016
    torchrun --nproc_per_node 8 tools/train_seg.py CONFIG --launcher pytorch --amp
    python tools/train_seg.py CONFIG --resume              # continue from the latest checkpoint in the work dir

The encoder checkpoint is the config's model.pretrained (or --cfg-options model.pretrained=PATH), as in mmseg's MAE
configs; any format mae_transfer.checkpoints reads. A whole segmentor (ours, or mmseg's released UperNet-MAE) is
--cfg-options load_from=PATH: loaded by exact names, its classifiers left out if it was trained for other classes.
Logs (loss, lr, time, ETA) go to the console, WORK_DIR/<timestamp>/vis_data/scalars.json (JSON lines) and
TensorBoard.
"""
import argparse
import logging
import os

import torch
from mmengine.config import DictAction
from mmengine.logging import print_log

from mae_transfer.seg.runner import ExactLoadingRunner, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a segmentor (mmseg config)")
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: work_dirs/<config name>)")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the latest checkpoint in the work dir (with a load_from: from that "
                             "training checkpoint, as in mmengine; to start from a segmentor, omit --resume)")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (CUDA)")
    parser.add_argument("--data-root", help="dataset root for every dataloader (ADE20K layout)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config entries, key=value (e.g. train_cfg.max_iters=1000)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)  # torch.distributed.launch passes it
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.amp and not torch.cuda.is_available():  # mmengine's AmpOptimWrapper would only assert deep inside
        raise SystemExit("--amp needs a CUDA GPU (mmengine's AmpOptimWrapper trains on accelerators only); "
                         "drop --amp to train in float32 here")
    cfg = load_config(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, data_root=args.data_root,
                      launcher=args.launcher)
    if args.amp:
        if cfg.optim_wrapper.type == "AmpOptimWrapper":
            print_log("AMP is already on in the config", logger="current", level=logging.WARNING)
        elif cfg.optim_wrapper.type != "OptimWrapper":
            raise ValueError(f"--amp needs optim_wrapper.type OptimWrapper, the config has {cfg.optim_wrapper.type}")
        else:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = args.resume
    runner = ExactLoadingRunner.from_cfg(cfg)
    runner.new_classes = True  # a load_from segmentor of other classes: new classifiers (not when resuming)
    runner.train()


if __name__ == "__main__":
    main()
