"""mmseg's IoUMetric, with the per-class results it only prints also returned, so they reach the logs and JSON."""
from typing import Dict

from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS

__all__ = ["PerClassIoUMetric"]


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """Returns aAcc, mIoU, mAcc (as IoUMetric, in %) plus 'IoU.<class>' and 'Acc.<class>' for every class (NaN for a
    class in neither the ground truth nor the predictions), all as Python floats."""

    def compute_metrics(self, results: list) -> Dict[str, float]:
        metrics = {k: float(v) for k, v in super().compute_metrics(results).items()}
        if self.format_only:
            return metrics
        intersect, union, pred_area, label_area = (sum(areas) for areas in zip(*results))
        per_class = self.total_area_to_metrics(intersect, union, pred_area, label_area, self.metrics,
                                               self.nan_to_num, self.beta)
        per_class.pop("aAcc", None)
        for metric, values in per_class.items():
            for name, value in zip(self.dataset_meta["classes"], values):
                metrics[f"{metric}.{name}"] = round(float(value) * 100, 2)
        return metrics
