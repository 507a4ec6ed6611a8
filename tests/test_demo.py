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
        assert saved["results"]["box AP"][init] == json.loads((run / "det" / "coco_ap.json").read_text())["bbox"]["AP"]
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
