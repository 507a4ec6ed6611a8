"""What tools/train_seg.py and tools/test_seg.py share: building the config, the runner that loads checkpoints by
exact names and checks the heads' class count against the data, and turning metrics into a report."""
import math
import os.path as osp
from typing import Any, Dict, Optional, Sequence

from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import CheckpointLoader, Runner
from mmseg.models.decode_heads.decode_head import BaseDecodeHead

from ..checkpoints import CheckpointError, read_file
from .load import load_segmentor

__all__ = ["ClassCountCheckHook", "ExactLoadingRunner", "load_config", "metrics_report"]

_DATALOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def load_config(path: str, *, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                data_root: Optional[str] = None, launcher: str = "none") -> Config:
    """The config at `path` with mmseg's tool conventions applied: --cfg-options merged, work_dir from the flag, else
    the config, else work_dirs/<config name>; `data_root` replaces every dataloader's dataset root (a config's
    top-level `data_root` is substituted when the file is read, so overriding it with --cfg-options changes nothing)."""
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("work_dirs", osp.splitext(osp.basename(path))[0])
    if data_root is not None:
        if not osp.isdir(data_root):
            raise FileNotFoundError(f"--data-root {data_root}: no such directory")
        for name in _DATALOADERS:
            if cfg.get(name) is not None:
                cfg[name].dataset.data_root = data_root
    return cfg


def metrics_report(metrics: Dict[str, float], classes: Sequence[str]) -> dict:
    """{'aAcc', 'mIoU', 'mAcc', 'per_class': {class: {'IoU', 'Acc'}}} from PerClassIoUMetric's flat metrics;
    NaN (a class in neither the ground truth nor the predictions) becomes None, which JSON can hold."""
    def value(key):
        v = metrics.get(key)
        return None if v is None or math.isnan(v) else float(v)

    return {"aAcc": value("aAcc"), "mIoU": value("mIoU"), "mAcc": value("mAcc"),
            "per_class": {name: {"IoU": value(f"IoU.{name}"), "Acc": value(f"Acc.{name}")} for name in classes}}


class ClassCountCheckHook(Hook):
    """Refuses decode heads whose num_classes is not the class count of the data, before training (the training and
    validation sets) and before testing: mmseg checks neither, so a head with more classes trains silently and one
    with fewer fails inside the loss."""

    priority = "VERY_HIGH"  # before any other hook acts on a model that does not fit the data

    def before_train(self, runner) -> None:
        _check_num_classes(runner, "train_dataloader")
        if runner.val_loop is not None:
            _check_num_classes(runner, "val_dataloader")

    def before_test(self, runner) -> None:
        _check_num_classes(runner, "test_dataloader")


def _check_num_classes(runner: Runner, dataloader: str) -> None:
    dataset = getattr(runner, dataloader).dataset
    classes = dataset.metainfo.get("classes")
    if classes is None:  # a dataset that names no classes: nothing to check against
        return
    count = len(classes)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    wrong = {f"model.{name}.num_classes": head.num_classes for name, head in model.named_modules()
             if isinstance(head, BaseDecodeHead) and head.num_classes != count}
    if wrong:
        raise ValueError(f"{dataloader}.dataset ({type(dataset).__name__}) has {count} classes (its metainfo "
                         f"'classes') but {', '.join(f'{key} is {n}' for key, n in wrong.items())}: set "
                         f"{' '.join(f'{key}={count}' for key in wrong)} (in the config or with --cfg-options)")


class ExactLoadingRunner(Runner):
    """mmengine's Runner whose checkpoint loading (`load_from`, --resume) is load_segmentor's: by exact names, with
    one report. `new_classes` (set by tools/train_seg.py) lets a `load_from` segmentor of other classes start
    training with new classifiers; resuming and evaluating stay exact. As in mmengine, --resume with a load_from
    resumes from load_from: it must then be a training checkpoint, not a released model. The heads' class count is
    checked against the data (ClassCountCheckHook)."""

    new_classes = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_hook(ClassCountCheckHook())

    def load_checkpoint(self, filename: str, map_location: Any = "cpu", strict: bool = False,
                        revise_keys: Any = ()) -> dict:
        # map_location, strict and revise_keys are mmengine's options for its own loading: tensors are read to the
        # CPU (load_state_dict and the optimizer move them to their parameters' devices), loading is always exact.
        if "://" in str(filename):  # mmengine's loaders (http(s) downloaded once per machine, open-mmlab://, ...)
            checkpoint = CheckpointLoader.load_checkpoint(str(filename), map_location="cpu")
        else:
            checkpoint, _ = read_file(filename)
        if self._resume and not (isinstance(checkpoint, dict) and "message_hub" in checkpoint
                                 and "iter" in checkpoint.get("meta", {})):
            raise CheckpointError(f"{filename}: --resume continues a run from one of its training checkpoints "
                                  f"(meta, message_hub), but this file holds no training state; to start training "
                                  f"from it, give it as load_from without --resume")
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        report = load_segmentor(model, checkpoint, str(filename), new_classes=self.new_classes and not self._resume)
        self._has_loaded = True
        self.logger.info(str(report))
        return checkpoint
