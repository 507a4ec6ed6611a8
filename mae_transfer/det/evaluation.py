"""COCO evaluation of a detector (detectron2's inference_on_dataset + COCOEvaluator), reported as one table of box
and mask AP and written to JSON beside the run."""
import logging
import math
import os
from typing import Any, Dict, Mapping, Optional

from detectron2.config import instantiate
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm
from tabulate import tabulate
from torch import nn

from ..checkpoints import write_json

__all__ = ["AP_FILE", "METRICS", "ap_table", "evaluate", "write_ap_json"]

logger = logging.getLogger(__name__)

AP_FILE = "coco_ap.json"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_TASKS = {"bbox": "box", "segm": "mask"}


def ap_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Box and mask AP (COCO's AP, AP50, AP75, APs/m/l in percent) as a text table."""
    rows = [[_TASKS[task], *(results[task].get(m, math.nan) for m in METRICS)] for task in _TASKS if task in results]
    return tabulate(rows, headers=["", *METRICS], floatfmt=".2f", tablefmt="pipe")


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # NaN (e.g. no small objects) is not JSON


def write_ap_json(results: Mapping[str, Mapping[str, float]], path: str, **info: Any) -> None:
    """Write {'bbox': {AP...}, 'segm': {AP...}, **info} (per-category APs included) atomically."""
    data = {**info, **{task: {k: _finite_or_none(float(v)) for k, v in res.items()} for task, res in results.items()}}
    write_json(path, data)


def evaluate(cfg, model: nn.Module, **info: Any) -> Dict[str, Dict[str, float]]:
    """Run cfg.dataloader.test through `model` into cfg.dataloader.evaluator; print the AP table and write it to
    <train.output_dir>/coco_ap.json (with `info`, e.g. the iteration). Returns the evaluator's results."""
    loader = instantiate(cfg.dataloader.test)  # first: it registers the dataset the evaluator reads
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    for task, res in results.items():
        if task in _TASKS and all(math.isnan(res[m]) for m in METRICS):
            # COCOEvaluator reports NaN when the model detected nothing at all; COCO's AP of no detections is 0
            # (no recall at any threshold). Object-size buckets stay NaN: which of them hold objects is unknown here.
            logger.warning("the model made no %s detections on the test set: AP 0", _TASKS[task])
            res.update(AP=0.0, AP50=0.0, AP75=0.0)
    if comm.is_main_process() and results:
        logger.info("COCO AP (%s):\n%s", cfg.dataloader.test.dataset.get("name", "test set"), ap_table(results))
        write_ap_json(results, os.path.join(cfg.train.output_dir, AP_FILE), **info)
    return results
