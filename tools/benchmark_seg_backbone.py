"""Segmentation backbone speed and memory: ours (ViTBackbone + Feature2Pyramid) against mmseg's MAE + Feature2Pyramid.

    python tools/benchmark_seg_backbone.py                                  # ViT-B, 2 x 3 x 512 x 512, this device
    python tools/benchmark_seg_backbone.py --arch large --batch-size 4 --device cuda

Both stacks are built with the same configuration (MAE ADE20K recipe: relative position bias, layer scale, drop path
0.1 while training, outputs of the reference blocks) and run on the same random batch at the training size, which
is the only size mmseg's MAE accepts. Rows: forward (eval, no grad) and forward + backward (train; the sum of the
four pyramid levels as the loss), bf16 autocast on CUDA and fp32 on CPU. Time is the median of
torch.utils.benchmark's blocked runs. Memory is what the step needs above what the process held before it (weights
and input): the peak allocated on the GPU, or the peak resident set size on CPU. Every measurement runs in a fresh process, so one
stack's allocations never count against the other's. The ratio is mmseg / ours: above 1, ours is faster / smaller.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.benchmark import Timer

IMPLEMENTATIONS = ("ours", "mmseg")
MODES = ("forward", "forward+backward")


def build(impl: str, arch: str, img_size: int) -> torch.nn.Module:
    from mmseg.models.backbones import MAE
    from mmseg.models.necks import Feature2Pyramid

    from mae_transfer.models import ARCHS
    from mae_transfer.seg import ViTBackbone, default_out_indices

    a = ARCHS[arch]
    out_indices = default_out_indices(a["depth"])
    if impl == "ours":
        backbone = ViTBackbone(arch=arch, img_size=img_size, out_indices=out_indices, drop_path_rate=0.1)
    else:
        backbone = MAE(img_size=img_size, patch_size=16, embed_dims=a["embed_dim"], num_layers=a["depth"],
                       num_heads=a["num_heads"], mlp_ratio=4, out_indices=list(out_indices), drop_path_rate=0.1,
                       init_values=1.0, norm_cfg=dict(type="LN", eps=1e-6))
    neck = Feature2Pyramid(a["embed_dim"], rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN"))
    return torch.nn.Sequential(backbone, neck)


def measure(impl: str, mode: str, arch: str, img_size: int, batch_size: int, device: str,
            min_run_time: float) -> Dict[str, float]:
    """Time and peak memory of one (implementation, mode); meant to run alone in its process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_pretrain import PeakRSS, sync  # the pretraining benchmark's CPU memory probe

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build(impl, arch, img_size).to(dev).train(mode != "forward")
    images = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None

    def step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            if mode == "forward":
                with torch.no_grad():
                    return model(images)
            levels = model(images)
        sum(level.float().sum() for level in levels).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: kernels chosen, allocator primed
    sync(dev)
    if dev.type == "cuda":
        held = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - held
    else:
        with PeakRSS() as before:
            pass
        with PeakRSS() as during:
            step()
        peak = during.peak - before.peak
    timing = Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time)
    return {"time_ms": timing.median * 1e3, "memory_mib": peak / 2 ** 20}


def run_isolated(args, impl: str, mode: str) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--only", impl, mode, "--arch", args.arch, "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--device", args.device, "--min-run-time", str(args.min_run_time)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(args) -> List[dict]:
    """One row per mode: ours and mmseg side by side, with mmseg / ours ratios."""
    rows = []
    for mode in MODES:
        ours, theirs = (run_isolated(args, impl, mode) for impl in IMPLEMENTATIONS)
        rows.append({"mode": mode, "ours": ours, "mmseg": theirs,
                     "time_ratio": theirs["time_ms"] / ours["time_ms"],
                     "memory_ratio": theirs["memory_mib"] / ours["memory_mib"]})
    return rows


def format_table(rows: List[dict]) -> str:
    head = (f"{'':18}{'ours ms':>10}{'mmseg ms':>10}{'mmseg/ours':>12}"
            f"{'ours MiB':>11}{'mmseg MiB':>11}{'mmseg/ours':>12}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['mode']:18}{r['ours']['time_ms']:10.1f}{r['mmseg']['time_ms']:10.1f}{r['time_ratio']:12.2f}"
                     f"{r['ours']['memory_mib']:11.0f}{r['mmseg']['memory_mib']:11.0f}{r['memory_ratio']:12.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="base", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-run-time", type=float, default=5.0, help="seconds of timed runs per measurement")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--only", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)  # one isolated run
    args = parser.parse_args(argv)
    if args.only:
        impl, mode = args.only
        print(json.dumps(measure(impl, mode, args.arch, args.img_size, args.batch_size, args.device,
                                 args.min_run_time)))
        return
    rows = benchmark(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"ViT-{args.arch} backbone + Feature2Pyramid, {args.batch_size} x 3 x {args.img_size} x {args.img_size}, "
          f"{name}, {'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}, torch {torch.__version__}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
