"""tools/train_det.py with the tiny config on the synthetic COCO-format world: training lowers the loss, --resume
continues it where the last checkpoint left off, --eval-only on its checkpoint reports the same box and mask AP, and
ground truth scores AP 100 through evaluate."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.engine import default_argument_parser, launch
from detectron2.structures import Boxes, Instances

from convert_helpers import load_tool
from pretrain_helpers import ROOT, one_thread, run_tool as run_processes
from mae_transfer.data.synthetic import generate_world
from mae_transfer.det import AP_FILE, ap_table, coco_instances, evaluate, write_ap_json
from mae_transfer.det.evaluation import METRICS
from mae_transfer.models import vit_tiny_patch16

CONFIG = Path(__file__).resolve().parents[1] / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"
ITERS = 30
RESUME_AT = 20  # the trained run also saves model_0000019.pth
train_det = load_tool("train_det")


@pytest.fixture(scope="session")
def coco_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det_world") / "world"
    generate_world(root, seed=0, size="tiny")  # 8 train and 4 val images of 64 px, 1-4 objects each
    return root / "coco"


def dataset_overrides(coco: Path) -> list:
    return [f"dataloader.train.dataset.json_file={coco}/annotations/instances_train.json",
            f"dataloader.train.dataset.image_root={coco}/train",
            f"dataloader.test.dataset.json_file={coco}/annotations/instances_val.json",
            f"dataloader.test.dataset.image_root={coco}/val",
            "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]


def run_tool(*flags_and_overrides: str):
    """tools/train_det.py's main in this process, with its own command-line parsing."""
    args = default_argument_parser().parse_args(["--config-file", str(CONFIG), *flags_and_overrides])
    return train_det.main(args)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def trained(coco_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det_run")
    run_tool(*dataset_overrides(coco_world), f"train.output_dir={out}", "train.device=cpu", f"train.max_iter={ITERS}",
             f"train.eval_period={ITERS}", "train.log_period=1", f"train.checkpointer.period={RESUME_AT}",
             "dataloader.train.total_batch_size=2")
    return out


def _ap_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_training_lowers_the_loss(trained):
    events = [json.loads(line) for line in (trained / "metrics.json").read_text().splitlines()]
    losses = {e["iteration"]: e["total_loss"] for e in events if "total_loss" in e}
    assert sorted(losses) == list(range(ITERS))
    # Logged values are medians over detectron2's 20-iteration window: the first is iteration 0's own loss.
    assert losses[ITERS - 1] < 0.7 * losses[0], losses
    assert (trained / "model_final.pth").is_file() and (trained / "last_checkpoint").read_text() == "model_final.pth"


def _events(run: Path) -> dict:
    return {e["iteration"]: e for e in map(json.loads, (run / "metrics.json").read_text().splitlines())
            if "total_loss" in e}


def _adam_steps(checkpoint: Path) -> set:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["trainer"]["optimizer"]["state"]
    return {int(s["step"]) for s in state.values()}


def test_resume_continues_from_the_last_checkpoint(trained, coco_world, tmp_path):
    """Interrupted after iteration RESUME_AT - 1: --resume runs exactly the remaining iterations, on the restored
    schedule and optimizer. (Not the same parameters: detectron2's TrainingSampler restarts its stream on resume.)"""
    shutil.copy(trained / f"model_{RESUME_AT - 1:07d}.pth", tmp_path)
    (tmp_path / "last_checkpoint").write_text(f"model_{RESUME_AT - 1:07d}.pth")
    run_tool("--resume", *dataset_overrides(coco_world), f"train.output_dir={tmp_path}", "train.device=cpu",
             f"train.max_iter={ITERS}", f"train.eval_period={ITERS}", "train.log_period=1",
             "dataloader.train.total_batch_size=2")
    resumed, uninterrupted = _events(tmp_path), _events(trained)
    assert sorted(resumed) == list(range(RESUME_AT, ITERS))
    for it in resumed:  # warmup and steps: the lr scheduler continued, not restarted
        assert resumed[it]["lr"] == pytest.approx(uninterrupted[it]["lr"], rel=1e-12), it
    assert _adam_steps(tmp_path / "model_final.pth") == _adam_steps(trained / "model_final.pth") == {ITERS}
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == ITERS - 1


def test_eval_only_on_the_checkpoint_reports_box_and_mask_ap(trained, coco_world, tmp_path):
    results = run_tool("--eval-only", *dataset_overrides(coco_world), "train.device=cpu",
                       f"train.init_checkpoint={trained / 'model_final.pth'}", f"train.output_dir={tmp_path}")
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert set(METRICS) <= set(results[task])
        assert 0 <= results[task]["AP"] <= 100
    written = _ap_json(tmp_path / AP_FILE)
    assert written["checkpoint"] == str(trained / "model_final.pth")
    assert ap_table(results) in (tmp_path / "log.txt").read_text()  # the printed table reaches the run's log too
    for task in ("bbox", "segm"):
        assert written[task]["AP"] == pytest.approx(results[task]["AP"])
    # The checkpoint holds the trained model exactly: the same AP as the evaluation at the end of training.
    at_end = _ap_json(trained / AP_FILE)
    assert at_end["iteration"] == ITERS
    for task in ("bbox", "segm"):
        assert written[task]["AP"] == pytest.approx(at_end[task]["AP"], abs=1e-6)


@pytest.mark.parametrize("precision, survives", [(torch.bfloat16, True), (None, True), (torch.float16, False)])
def test_gradient_compression_keeps_small_gradients_without_a_loss_scale(precision, survives, tmp_path,
                                                                         monkeypatch):
    """The configs' train.ddp.fp16_compression: a gradient of 1e-8 is below fp16's range; it is lost under fp16 AMP
    as in detectron2 (the loss scale keeps real gradients above it) but must survive bf16 AMP and float32, which
    have no loss scale.
    One gloo process posing as one of two, so that detectron2's create_ddp_model wraps the model."""
    import torch.distributed as dist
    from detectron2.utils import comm
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        linear = torch.nn.Linear(4, 1, bias=False)
        ddp = train_det.create_ddp(linear, dict(fp16_compression=True, device_ids=None), precision)
        ddp(torch.full((1, 4), 1e-8)).sum().backward()
        expected = torch.full((1, 4), 1e-8) if survives else torch.zeros(1, 4)
        torch.testing.assert_close(linear.weight.grad, expected, rtol=1e-2, atol=0)
    finally:
        dist.destroy_process_group()


def test_eval_only_resumes_the_run_s_last_checkpoint_and_refuses_an_encoder(trained, coco_world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / "model_final.pth", run)
    (run / "last_checkpoint").write_text("model_final.pth")
    results = run_tool("--eval-only", "--resume", *dataset_overrides(coco_world), "train.device=cpu",
                       f"train.output_dir={run}")
    at_end = _ap_json(trained / AP_FILE)
    assert _ap_json(run / AP_FILE)["checkpoint"] == str(run / "model_final.pth")
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == pytest.approx(at_end[task]["AP"], abs=1e-6)

    encoder = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": vit_tiny_patch16(img_size=32).state_dict()}, encoder)  # a 2x2 grid, the model's is 4x4
    with pytest.raises(ValueError, match=rf"--eval-only evaluates a trained detector, but {encoder} holds an "
                                         r"encoder only"):
        run_tool("--eval-only", *dataset_overrides(coco_world), "train.device=cpu",
                 f"train.init_checkpoint={encoder}", f"train.output_dir={tmp_path / 'none'}")
    # The checkpointer's note on what it adapted reaches the run's log
    assert "pos_embed resized from a 2x2 to a 4x4 grid" in (tmp_path / "none" / "log.txt").read_text()


def test_eval_only_resume_without_a_last_checkpoint_says_so(coco_world, tmp_path):
    with pytest.raises(ValueError, match=rf"--eval-only evaluates a trained detector, but --resume found no "
                                         rf"last_checkpoint in {tmp_path} \(train\.output_dir\)"):
        run_tool("--eval-only", "--resume", *dataset_overrides(coco_world), "train.device=cpu",
                 f"train.output_dir={tmp_path}")


class GroundTruthModel(torch.nn.Module):
    """Predicts, for each test image, its own annotations (detectron2's conversion to Instances) with score 1."""

    def __init__(self, dataset_dicts):
        super().__init__()
        self.images = {d["image_id"]: d for d in dataset_dicts}

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            d = self.images[x["image_id"]]
            gt = annotations_to_instances(d["annotations"], (d["height"], d["width"]), mask_format="bitmask")
            gt.pred_boxes, gt.pred_classes, gt.pred_masks = gt.gt_boxes, gt.gt_classes, gt.gt_masks.tensor
            gt.scores = torch.ones(len(gt))
            for name in ("gt_boxes", "gt_classes", "gt_masks"):
                gt.remove(name)
            outputs.append({"instances": gt})
        return outputs


def _test_set(coco_world, out):
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(CONFIG)),
                                     [*dataset_overrides(coco_world), f"train.output_dir={out}"])
    test = cfg.dataloader.test.dataset
    return cfg, coco_instances(test.name, test.json_file, test.image_root, filter_empty=False)


def test_ground_truth_as_predictions_scores_ap_100(coco_world, tmp_path):
    cfg, dicts = _test_set(coco_world, tmp_path)
    assert sum(len(d["annotations"]) for d in dicts) >= len(dicts)

    results = evaluate(cfg, GroundTruthModel(dicts))
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75"):
            assert results[task][metric] == pytest.approx(100.0), (task, metric)
        # Object-size buckets without objects are NaN (written as null), any other is 100.
        assert all(math.isnan(results[task][m]) or results[task][m] == pytest.approx(100.0) for m in METRICS)
    rows = {line.split("|")[1].strip(): line for line in ap_table(results).splitlines()[2:]}
    assert set(rows) == {"box", "mask"} and all(row.count("100.00") >= 3 for row in rows.values())
    assert _ap_json(tmp_path / AP_FILE)["segm"]["AP"] == pytest.approx(100.0)


def _evaluate_ground_truth(coco_world: Path, out: Path) -> None:
    """One of launch's processes: each infers its shard of the test set; COCOEvaluator gathers them on rank 0."""
    cfg, dicts = _test_set(coco_world, out)
    evaluate(cfg, GroundTruthModel(dicts))


def test_two_processes_evaluate_each_test_image_once(coco_world, tmp_path):
    """An image inferred by both processes would add duplicate detections (false positives), one by neither would
    lose its objects: either way the ground truth would score below 100."""
    launch(_evaluate_ground_truth, 2, dist_url="auto", args=(coco_world, tmp_path))  # gloo: no GPU here
    written = _ap_json(tmp_path / AP_FILE)
    for task in ("bbox", "segm"):
        assert written[task]["AP"] == pytest.approx(100.0), task


def test_two_process_training_runs_on_cpu_and_rank_0_alone_writes(coco_world, tmp_path):
    """--num-gpus 2 without a GPU: detectron2's launch joins two CPU processes over gloo, each wraps the detector in
    DDP (with no device ids: a CPU module), and the hooks that write run on rank 0 only."""
    result = run_processes([sys.executable, str(ROOT / "tools" / "train_det.py"), "--config-file", str(CONFIG),
                            "--num-gpus", "2", "--dist-url", "auto", *dataset_overrides(coco_world), "train.device=cpu",
                            f"train.output_dir={tmp_path}", "train.max_iter=4", "train.eval_period=4",
                            "train.log_period=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(tmp_path.glob("model_0*.pth"))  # the period (200) is not reached in 4 iterations
    for log in ("log.txt", "log.txt.rank1"):  # each process's own log: each infers 2 of the 4 test images
        assert "Start inference on 2 batches" in (tmp_path / log).read_text(), log
    # One writer: each iteration's losses once, then the evaluation's AP once, after the 4 iterations
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [(r["iteration"], "total_loss" in r, "bbox/AP" in r) for r in records] == [
        (0, True, False), (1, True, False), (2, True, False), (3, True, False), (4, False, True)]
    assert _ap_json(tmp_path / AP_FILE)["iteration"] == 4


class DetectsNothing(torch.nn.Module):
    def forward(self, inputs):
        return [{"instances": Instances((x["height"], x["width"]), pred_boxes=Boxes(torch.zeros(0, 4)),
                                        scores=torch.zeros(0), pred_classes=torch.zeros(0, dtype=torch.long),
                                        pred_masks=torch.zeros(0, x["height"], x["width"], dtype=torch.bool))}
                for x in inputs]


def test_no_detections_score_ap_0_not_nan(coco_world, tmp_path):
    """COCOEvaluator gives NaN when nothing is detected; on a test set with objects, COCO's AP is then 0."""
    cfg, _ = _test_set(coco_world, tmp_path)
    results = evaluate(cfg, DetectsNothing())
    written = _ap_json(tmp_path / AP_FILE)
    for task in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75"):
            assert results[task][metric] == 0.0 and written[task][metric] == 0.0, (task, metric)


def _rows(table: str) -> dict:
    """The table's rows by their label, each as the list of its cells."""
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                              for line in table.splitlines()[2:])}


def test_ap_table_labels_each_task_s_row_and_takes_a_box_only_result():
    box = dict(AP=40.0, AP50=61.0, AP75=42.0, APs=math.nan, APm=38.5, APl=45.25)
    mask = dict(AP=35.0, AP50=58.0, AP75=36.0, APs=math.nan, APm=30.0, APl=41.0)
    rows = _rows(ap_table({"segm": mask, "bbox": box}))
    assert rows == {"box": ["40.00", "61.00", "42.00", "nan", "38.50", "45.25"],
                    "mask": ["35.00", "58.00", "36.00", "nan", "30.00", "41.00"]}
    # A detector without a mask head: COCOEvaluator reports bbox alone, and the table holds its one row.
    assert _rows(ap_table({"bbox": box})) == {"box": rows["box"]}


def test_ap_json_is_strict_json_with_nan_as_null(tmp_path):
    write_ap_json({"bbox": dict(AP=12.5, AP50=30.0, APs=math.nan, **{"AP-disc": 7.0})}, tmp_path / AP_FILE,
                  iteration=7)
    text = (tmp_path / AP_FILE).read_text()

    def refuse(constant):  # Python's json reads NaN; JSON (RFC 8259), jq and JavaScript do not
        raise ValueError(f"{constant} is not JSON")

    assert json.loads(text, parse_constant=refuse) == {
        "iteration": 7, "bbox": {"AP": 12.5, "AP50": 30.0, "APs": None, "AP-disc": 7.0}}
