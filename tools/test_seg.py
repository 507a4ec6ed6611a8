r"""Evaluate a trained segmentor: mIoU, mAcc, aAcc and per-class IoU / accuracy, printed and written to JSON.

    python tools/test_seg.py seg_configs/upernet_mae_vit_base_ade20k_512x512_160k.py work_dirs/.../iter_160000.pth
    python tools/test_seg.py CONFIG CHECKPOINT --cfg-options model.test_cfg.mode=whole \
        model.data_preprocessor.test_cfg.size_divisor=16       # whole images, any size (padding cut from the output)
    torchrun --nproc_per_node 8 tools/test_seg.py CONFIG CHECKPOINT --launcher pytorch

The checkpoint is one tools/train_seg.py wrote or one of mmseg's released UperNet-MAE models (a path, or a URL that
mmengine downloads), loaded by exact names: one that does not fit the config's model is refused, naming the tensors
(mae_transfer.seg.load).

The metrics go to --json (default WORK_DIR/metrics.json):
    {"config", "checkpoint", "aAcc", "mIoU", "mAcc", "per_class": {class: {"IoU", "Acc"}}}   (percent)
"""
import argparse
import os
import os.path as osp

from mmengine.config import DictAction
from mmengine.dist import is_main_process

from mae_transfer.checkpoints import write_json
from mae_transfer.seg.runner import ExactLoadingRunner, load_config, metrics_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a segmentor (mmseg config + checkpoint)")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train_seg.py, or an mmseg UperNet-MAE one "
                                           "(its model zoo's, a path or URL); loaded by exact names")
    parser.add_argument("--work-dir", help="where logs go (default: work_dirs/<config name>)")
    parser.add_argument("--json", help="metrics file (default: WORK_DIR/metrics.json)")
    parser.add_argument("--data-root", help="dataset root for every dataloader (ADE20K layout)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                        help="override config entries, key=value (e.g. model.test_cfg.mode=whole)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # A URL (https://, open-mmlab://, ...) is for mmengine's loaders in ExactLoadingRunner, as mmseg's test.py allows.
    if "://" not in args.checkpoint and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    cfg = load_config(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, data_root=args.data_root,
                      launcher=args.launcher)
    cfg.load_from = args.checkpoint
    runner = ExactLoadingRunner.from_cfg(cfg)
    metrics = runner.test()
    report = {"config": args.config, "checkpoint": args.checkpoint,
              **metrics_report(metrics, runner.test_dataloader.dataset.metainfo["classes"])}
    if is_main_process():
        path = args.json or osp.join(cfg.work_dir, "metrics.json")
        write_json(path, report)
        print(f"mIoU {report['mIoU']:.2f}  mAcc {report['mAcc']:.2f}  aAcc {report['aAcc']:.2f}  -> {path}")
    return report


if __name__ == "__main__":
    main()
