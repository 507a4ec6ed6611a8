#!/usr/bin/env python
"""The whole toolkit on the built-in synthetic world (`make demo`): MAE pretraining, then detection, segmentation and
classification fine-tuned from the MAE encoder and from a random one, with one table of the results.

    python tools/demo.py                   # 8-14 min on 2 CPU cores; everything under runs/demo
    python tools/demo.py --quick           # the same steps on a tiny world, a few iterations each (a smoke run)

Every step is a subprocess running the tool a user would run, with the flags printed before it starts:
mae_transfer.data.synthetic, pretrain/main_pretrain.py, tools/visualize_mae.py, tools/train_det.py,
tools/train_seg.py + tools/test_seg.py and tools/train_cls.py. The MAE-initialised and the from-scratch run of each
task go side by side, each on half the cores (their lines prefixed [mae] / [scratch]): tiny models use one thread
far better than two, so on 2 cores the pair takes ~1.5x less time than one after the other. Only the run lengths
are the demo's own (below); the recipes are the tiny presets and configs. The results are read back from the
files those tools write:

    runs/demo/results.md, results.json    box AP, mask AP, mIoU, top-1: MAE-initialised vs from scratch
    runs/demo/loss_curves.png             pretraining loss and the three fine-tunings' training losses
    runs/demo/reconstructions.png         the pretrained MAE's reconstructions of held-out images
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DET_CONFIG = "det_configs/mask_rcnn_vit_tiny_synthetic.py"
SEG_CONFIG = "seg_configs/upernet_mae_vit_tiny_synthetic_64x64.py"
INITS = ("mae", "scratch")


@dataclass(frozen=True)
class RunLengths:
    """How long each step trains: the only settings of the demo's own."""
    world: str              # synthetic world size (mae_transfer.data.synthetic.PRESETS)
    pretrain_epochs: int
    det_iters: int
    seg_iters: int
    cls_epochs: int
    batch_size: int = 0     # pretraining and classification batch; 0 keeps the presets' (64 and 32)


# 8-14 minutes on 2 CPU cores in all (measured on an AVX-512 Xeon / an EPYC): pretraining 2.1 / 3.0, both Mask R-CNNs
# side by side 2.9 / 4.3, both UperNets 1.8 / 3.0 with their tests, both classifications 1.2 / 1.8.
FULL = RunLengths(world="small", pretrain_epochs=20, det_iters=300, seg_iters=500, cls_epochs=20)
QUICK = RunLengths(world="tiny", pretrain_epochs=1, det_iters=4, seg_iters=4, cls_epochs=1, batch_size=8)


@dataclass(frozen=True)
class Runner:
    """Runs tools from the repository root, each one's output both shown (after `tag`) and kept in its log; stops
    the demo if one fails. `threads` caps the tools' CPU threads (None: PyTorch's default, all cores)."""
    tag: str = ""
    threads: Optional[int] = None
    _print_lock = threading.Lock()  # two runners share the console: whole lines, never mixed

    def say(self, text: str) -> None:
        with self._print_lock:
            for line in text.splitlines() or [""]:
                sys.stdout.write(f"[{self.tag}] {line}\n" if self.tag else f"{line}\n")
            sys.stdout.flush()

    def run(self, cmd: Sequence[str], log: Path) -> None:
        cmd = [sys.executable, *map(str, cmd)]
        self.say(f"\n$ {shlex.join(cmd[1:])}")
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}))
        start = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            for line in proc.stdout:
                self.say(line.rstrip("\n"))
                f.write(line)
        if proc.wait():
            raise SystemExit(f"demo: step failed (exit {proc.returncode}); its output is in {log}")
        self.say(f"[{time.time() - start:.0f}s]")


def pretrain(runner: Runner, out: Path, world: Path, lengths: RunLengths) -> Path:
    """The tiny MAE preset on the unlabeled images; returns the exported encoder."""
    runner.run(["pretrain/main_pretrain.py", "--preset", "tiny", "--data_path", world / "pretrain",
                "--output_dir", out / "pretrain", "--epochs", lengths.pretrain_epochs,
                "--warmup_epochs", min(2, lengths.pretrain_epochs - 1), "--save_every", lengths.pretrain_epochs,
                *batch_size(lengths)],
               out / "pretrain.log")
    runner.run(["tools/visualize_mae.py", "--checkpoint", out / "pretrain" / "mae_full.safetensors",
                "--images", world / "cls" / "val", "--num_images", 6, "--out", out / "reconstructions.png"],
               out / "visualize.log")
    return out / "pretrain" / "encoder.safetensors"


def detection(runner: Runner, out: Path, world: Path, encoder: Optional[Path], lengths: RunLengths) -> dict:
    """Mask R-CNN (tiny ViTDet config) on the world's COCO-format data; returns coco_ap.json."""
    coco, work, iters = world / "coco", out / "det", lengths.det_iters
    step = max(1, iters // 20)
    runner.run(["tools/train_det.py", "--config-file", DET_CONFIG,
                f"train.init_checkpoint={encoder or ''}", f"train.output_dir={work}",
                f"dataloader.train.dataset.json_file={coco}/annotations/instances_train.json",
                f"dataloader.train.dataset.image_root={coco}/train",
                f"dataloader.test.dataset.json_file={coco}/annotations/instances_val.json",
                f"dataloader.test.dataset.image_root={coco}/val",
                f"train.max_iter={iters}", f"train.eval_period={iters}", f"train.checkpointer.period={iters}",
                f"train.log_period={max(1, iters // 40)}",
                f"lr_multiplier.scheduler.num_updates={iters}",
                # lr steps at 90% and 95% of the run, as ViTDet's schedule (and distinct however short the run)
                f"lr_multiplier.scheduler.milestones=[{iters - 2 * step},{iters - step}]"],
               out / "det.log")
    return json.loads((work / "coco_ap.json").read_text())


def segmentation(runner: Runner, out: Path, world: Path, encoder: Optional[Path], lengths: RunLengths) -> dict:
    """UperNet (tiny config) on the world's ADE20K-layout data, then tools/test_seg.py; returns its metrics.json."""
    work, iters = out / "seg", lengths.seg_iters
    warmup = max(1, iters // 20)
    options = [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
               f"default_hooks.checkpoint.interval={iters}", f"default_hooks.logger.interval={max(1, iters // 40)}",
               f"param_scheduler.0.end={warmup}", f"param_scheduler.1.begin={warmup}", f"param_scheduler.1.end={iters}"]
    if encoder:
        options.append(f"model.pretrained={encoder}")
    runner.run(["tools/train_seg.py", SEG_CONFIG, "--work-dir", work, "--data-root", world / "ade", "--cfg-options",
                *options], out / "seg.log")
    runner.run(["tools/test_seg.py", SEG_CONFIG, work / f"iter_{iters}.pth", "--work-dir", work, "--data-root",
                world / "ade", "--json", work / "metrics.json"], out / "seg_test.log")
    return json.loads((work / "metrics.json").read_text())


def batch_size(lengths: RunLengths) -> List:
    return ["--batch_size", lengths.batch_size] if lengths.batch_size else []


def classification(runner: Runner, out: Path, world: Path, encoder: Optional[Path], lengths: RunLengths) -> dict:
    """Fine-tuning with the tiny classification preset on the world's class folders; returns metrics.json."""
    work = out / "cls"
    runner.run(["tools/train_cls.py", "--preset", "tiny", "--data_path", world / "cls", "--output_dir", work,
                "--epochs", lengths.cls_epochs, "--warmup_epochs", min(5, lengths.cls_epochs - 1),
                "--save_every", lengths.cls_epochs, *batch_size(lengths),
                *(["--finetune", encoder] if encoder else [])], out / "cls.log")
    return json.loads((work / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------ results
def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(out: Path) -> Dict[str, Dict[str, List[tuple]]]:
    """(step, training loss) series from each tool's own log: main_pretrain/train_cls log.jsonl, detectron2's
    metrics.json, mmengine's vis_data/scalars.json."""
    def steps(records, step_key, loss_key):
        return [(r[step_key], r[loss_key]) for r in records if loss_key in r and step_key in r]

    curves = {"MAE pretraining": {"mae": steps([r for r in read_jsonl(out / "pretrain" / "log.jsonl")
                                                if r["kind"] == "step"], "step", "loss")}}
    for task, title in (("det", "Mask R-CNN"), ("seg", "UperNet"), ("cls", "classification")):
        curves[title] = {}
        for init in INITS:
            work = out / init / task
            if task == "det":
                series = steps(read_jsonl(work / "metrics.json"), "iteration", "total_loss")
            elif task == "seg":
                series = steps(read_jsonl(sorted(work.glob("*/vis_data/scalars.json"))[-1]), "step", "loss")
            else:
                series = steps([r for r in read_jsonl(work / "log.jsonl") if r["kind"] == "step"], "step", "loss")
            curves[title][init] = series
    return curves


def plot_curves(curves: Dict[str, Dict[str, List[tuple]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    for ax, (title, series) in zip(axes, curves.items()):
        for init, points in series.items():
            if points:
                ax.plot(*zip(*points), label=init)
        ax.set(title=title, xlabel="iteration", ylabel="training loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


METRICS = (  # (name in the table, task, how to read it from that tool's JSON)
    ("box AP", "det", lambda r: r["bbox"]["AP"]),
    ("mask AP", "det", lambda r: r["segm"]["AP"]),
    ("mIoU", "seg", lambda r: r["mIoU"]),
    ("top-1", "cls", lambda r: r["final"]["top1"]),
)


def summarize(raw: Dict[str, Dict[str, dict]]) -> Dict[str, Dict[str, float]]:
    """{metric: {init: value}} from each tool's own results file."""
    table = {}
    for name, task, read in METRICS:
        table[name] = {init: read(raw[init][task]) for init in INITS}
    return table


def markdown(table: Dict[str, Dict[str, float]], lengths: RunLengths, minutes: float) -> str:
    def cell(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    rows = [f"| {name} | {cell(v['mae'])} | {cell(v['scratch'])} |" for name, v in table.items()]
    return "\n".join([
        "| metric (%) | MAE-initialised | from scratch |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Synthetic world '{lengths.world}'; pretraining {lengths.pretrain_epochs} epochs; Mask R-CNN "
        f"{lengths.det_iters} iterations; UperNet {lengths.seg_iters} iterations; classification "
        f"{lengths.cls_epochs} epochs. {minutes:.1f} minutes in all.",
    ]) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything goes")
    parser.add_argument("--quick", action="store_true", help="tiny world, a few iterations per step (smoke run)")
    args = parser.parse_args(argv)
    lengths = QUICK if args.quick else FULL
    out = args.out.resolve()
    start = time.time()

    # One folder per world size, so --quick and the full demo can share an --out. The generator reuses a world of
    # the same arguments and refuses anything else in the folder.
    world = out / f"world-{lengths.world}"
    out.mkdir(parents=True, exist_ok=True)
    Runner().run(["-m", "mae_transfer.data.synthetic", "--out", world, "--size", lengths.world], out / "world.log")
    for stale in ("pretrain", *INITS):  # a rerun starts over rather than resuming half of it
        shutil.rmtree(out / stale, ignore_errors=True)

    encoder = pretrain(Runner(), out, world, lengths)
    raw: Dict[str, Dict[str, dict]] = {init: {} for init in INITS}
    for init in INITS:
        (out / init).mkdir()
    threads = max(1, (os.cpu_count() or 1) // len(INITS))
    with ThreadPoolExecutor(len(INITS)) as pool:
        for task, fn in (("det", detection), ("seg", segmentation), ("cls", classification)):
            runs = {init: pool.submit(fn, Runner(init, threads), out / init, world,
                                      encoder if init == "mae" else None, lengths) for init in INITS}
            for init, result in runs.items():
                raw[init][task] = result.result()

    plot_curves(loss_curves(out), out / "loss_curves.png")
    table = summarize(raw)
    minutes = (time.time() - start) / 60
    results = {"results": table, "run_lengths": asdict(lengths),
               "minutes": round(minutes, 1), "encoder": str(encoder)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(table, lengths, minutes)
    (out / "results.md").write_text(md)
    print("\n" + md)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; pictures: {out / 'loss_curves.png'}, "
          f"{out / 'reconstructions.png'}")
    return results


if __name__ == "__main__":
    main()
