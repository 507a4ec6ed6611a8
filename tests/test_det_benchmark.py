"""tools/benchmark_backbones.py on a tiny setting: it measures both implementations and prints the table."""
import sys

from convert_helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import benchmark_backbones  # noqa: E402


def test_benchmark_prints_ours_and_detectron2s_rows(capsys):
    rows = benchmark_backbones.main(["--tasks", "det", "--arch", "tiny", "--size", "64", "--batch", "1",
                                     "--warmup", "0", "--iters", "1", "--device", "cpu", "--threads", "1",
                                     "--rounds", "2"])
    assert [(r["task"], r["mode"]) for r in rows] == [("det", "forward"), ("det", "forward+backward")]
    assert all(r[impl]["ms"] > 0 for r in rows for impl in ("ours", "stock"))
    assert all(len(r["ratios"][key]) == 2 for r in rows for key in ("ms", "cost"))  # one ratio per round
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("det: ours vs detectron2 ViT")]
    assert [line.split()[6] for line in table] == ["forward", "forward+backward"]
    # name (5 words), size, mode, 2 times and 2 ratios of them, the range of one, 2 memories and their ratio
    assert all(len(line.split()) == 15 for line in table)
    for r, line in zip(rows, table):
        low, high = r["ratios"]["cost"]
        assert line.split()[11] == f"{low:.2f}-{high:.2f}"
