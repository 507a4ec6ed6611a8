"""`make demo` scaled down (tools/demo.py --quick): every step runs through its tool and results.json holds one
number per metric and initialisation, each in its valid range, all read back from the tools' own outputs."""
import json

from convert_helpers import load_tool

demo = load_tool("demo")


def test_quick_demo_writes_results_within_valid_ranges(tmp_path):
    results = demo.main(["--quick", "--out", str(tmp_path)])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == results["results"]
    assert set(saved["results"]) == {"box AP", "mask AP", "mIoU", "top-1"}
    for metric, by_init in saved["results"].items():
        assert set(by_init) == {"mae", "scratch"}, metric
        for init, value in by_init.items():
            # A few iterations can leave a detector with no detections at all: COCO then reports AP 0, not NaN.
            assert value is not None and 0.0 <= value <= 100.0, (metric, init, value)
    # The table's numbers are the tools' own results files, read back.
    for init in ("mae", "scratch"):
        run = tmp_path / init
        coco_ap = json.loads((run / "det" / "coco_ap.json").read_text())
        assert saved["results"]["box AP"][init] == coco_ap["bbox"]["AP"]
        assert saved["results"]["mask AP"][init] == coco_ap["segm"]["AP"]
        assert saved["results"]["mIoU"][init] == json.loads((run / "seg" / "metrics.json").read_text())["mIoU"]
        top1 = json.loads((run / "cls" / "metrics.json").read_text())["final"]["top1"]
        assert saved["results"]["top-1"][init] == top1
    assert json.loads((tmp_path / "world-tiny" / "world.json").read_text())["size"] == "tiny"  # a folder per size
    # The MAE-initialised runs load the pretrained encoder (each tool's load report names it); the others do not.
    encoder = str(tmp_path / "pretrain" / "encoder.safetensors")
    for task in ("det", "seg", "cls"):
        assert f"tensors from {encoder}" in (tmp_path / "mae" / f"{task}.log").read_text(), task
        assert encoder not in (tmp_path / "scratch" / f"{task}.log").read_text(), task
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| metric (%) | MAE-initialised | from scratch |")
    for picture in ("loss_curves.png", "reconstructions.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_reads_each_metric_from_its_own_field_and_column():
    # Each tool's results file as it writes it, with every number distinct.
    raw = {init: {"det": {"bbox": {"AP": 10.0 + k}, "segm": {"AP": 20.0 + k}}, "seg": {"mIoU": 30.0 + k},
                  "cls": {"final": {"top1": 40.0 + k}}} for k, init in enumerate(("mae", "scratch"))}
    table = demo.summarize(raw)
    assert table == {"box AP": {"mae": 10.0, "scratch": 11.0}, "mask AP": {"mae": 20.0, "scratch": 21.0},
                     "mIoU": {"mae": 30.0, "scratch": 31.0}, "top-1": {"mae": 40.0, "scratch": 41.0}}
    lines = demo.markdown(table, demo.QUICK, 1.25).splitlines()
    assert lines[:6] == ["| metric (%) | MAE-initialised | from scratch |", "|---|---:|---:|",
                         "| box AP | 10.0 | 11.0 |", "| mask AP | 20.0 | 21.0 |", "| mIoU | 30.0 | 31.0 |",
                         "| top-1 | 40.0 | 41.0 |"]
