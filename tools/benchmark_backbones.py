"""Transfer backbones against the host libraries' stock ones: speed and memory, side by side.

    python tools/benchmark_backbones.py --arch base --size 256 --batch 1            # CPU, fp32, small
    python tools/benchmark_backbones.py --arch large --batch 2 --device cuda        # 1024 px det, 512 px seg, bf16

- det: our ViTDet backbone (mae_transfer.det.ViT: detectron2's ViT with SDPA attention) against detectron2's stock
  detectron2.modeling.ViT, both under detectron2's SimpleFeaturePyramid, built from the same config
  (det_configs/mask_rcnn_vit_base_100ep.py at --arch: window attention with ViTDet's global blocks, relative
  positions, drop path) at --size (default 1024, ViTDet's training size);
- seg: our mmseg backbone (mae_transfer.seg.ViTBackbone) against mmseg's MAE, both under mmseg's Feature2Pyramid,
  with the MAE ADE20K recipe (relative position bias, layer scale, drop path 0.1, outputs of the reference blocks)
  at --size (default 512: mmseg's MAE runs only at the size it was built for).

Rows: forward (eval mode, no grad) and forward + backward (train mode; the sum of the pyramid levels as the loss),
under autocast in --amp on CUDA. Time is the median over --iters steps after --warmup. Memory is, as in
tools/benchmark_pretrain.py (whose helpers this reuses), the peak allocated on the GPU, or on CPU the growth of the
peak resident set over its size once the model and input exist; every measurement runs in a fresh process, so no
row counts another's allocations. Ratios are stock / ours: above 1, ours is faster / smaller. "(eq. speed)" is the
time ratio at equal matmul speed: each step's time times the matmul rate measured right after it, which cancels a
shared machine's drift between the two processes (tools/benchmark_pretrain.py's MatmulProbe). The two are measured
in turn --rounds times (every other round stock first). Times and memory are each implementation's medians over
rounds; the two time ratios are medians of the ratios within a round (so they can differ a little from the quotient
of the median times beside them), "eq. range" is the range of the equal-speed ones, and the memory ratio is that of
the medians.
"""
import argparse
import multiprocessing
import resource
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_pretrain import MatmulProbe, medians, resident_bytes, round_ratios, time_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"det": ("detectron2 ViT", 1024), "seg": ("mmseg MAE", 512)}  # stock implementation, default size
MODES = ("forward", "forward+backward")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def det_backbone(stock: bool, arch: str, size: int) -> nn.Module:
    """ViT + SimpleFeaturePyramid of the ViTDet base config at `arch`, with our ViT class or detectron2's."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import ViT as Detectron2ViT

    from mae_transfer.det import vitdet_arch

    cfg = LazyConfig.load(str(ROOT / "det_configs" / "mask_rcnn_vit_base_100ep.py")).model.backbone
    cfg.net.update(vitdet_arch(arch), img_size=size)
    cfg.square_pad = size
    if stock:
        cfg.net._target_ = Detectron2ViT  # use_act_checkpoint=False, as ours: no fairscale needed
    return instantiate(cfg)


def seg_backbone(stock: bool, arch: str, size: int) -> nn.Module:
    """Backbone + Feature2Pyramid with the MAE ADE20K recipe: ours (ViTBackbone) or mmseg's MAE."""
    from mmseg.models.backbones import MAE
    from mmseg.models.necks import Feature2Pyramid

    from mae_transfer.models import ARCHS
    from mae_transfer.seg import ViTBackbone, default_out_indices

    a = ARCHS[arch]
    out_indices = default_out_indices(a["depth"])
    if stock:
        backbone = MAE(img_size=size, patch_size=16, embed_dims=a["embed_dim"], num_layers=a["depth"],
                       num_heads=a["num_heads"], mlp_ratio=4, out_indices=list(out_indices), drop_path_rate=0.1,
                       init_values=1.0, norm_cfg=dict(type="LN", eps=1e-6))
    else:
        backbone = ViTBackbone(arch=arch, img_size=size, out_indices=out_indices, drop_path_rate=0.1)
    neck = Feature2Pyramid(a["embed_dim"], rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN"))
    return nn.Sequential(backbone, neck)


BUILDERS = {"det": det_backbone, "seg": seg_backbone}


def measure(task: str, stock: bool, mode: str, args: argparse.Namespace) -> Dict[str, float]:
    """Median step time and peak memory of one (task, implementation, mode); runs in a fresh process."""
    device = torch.device(args.device)
    amp = AMP[args.amp] if device.type == "cuda" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.size or TASKS[task][1]
    model = BUILDERS[task](stock, args.arch, size).to(device).train(mode != "forward")
    images = torch.randn(args.batch, 3, size, size, device=device)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None), torch.set_grad_enabled(mode != "forward"):
            out = model(x)
            levels = out.values() if isinstance(out, dict) else out  # detectron2: {"p2": ...}; mmseg: a tuple
            loss = sum(level.float().sum() for level in levels)
        if mode != "forward":
            loss.backward()
            model.zero_grad(set_to_none=True)
        return loss.detach()

    probe = MatmulProbe(device, amp or torch.float32)  # before the CPU baseline; subtracted on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resident_bytes()
    times, rates = time_step(step, images, args.warmup, args.iters, probe)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) - probe.nbytes
    else:  # ru_maxrss is in KiB
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    # cost: each step in matmul-peak FLOPs (seconds x the machine's matmul rate right after it)
    return {"ms": statistics.median(times) * 1e3, "mib": memory / 2 ** 20,
            "cost": statistics.median(t * r for t, r in zip(times, rates))}


def benchmark(args: argparse.Namespace) -> List[dict]:
    """One row per (task, mode): ours and the stock implementation, each measured in its own process, in turn."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for task in args.tasks:
        for mode in MODES:
            runs: Dict[str, List[Dict[str, float]]] = {"ours": [], "stock": []}
            for r in range(args.rounds):
                for impl in ("ours", "stock") if r % 2 == 0 else ("stock", "ours"):
                    with context.Pool(1) as pool:
                        runs[impl].append(pool.apply(measure, (task, impl == "stock", mode, args)))
            rows.append({"task": task, "mode": mode, "size": args.size or TASKS[task][1],
                         **{impl: medians(runs[impl]) for impl in runs},
                         "ratios": {key: round_ratios(runs["stock"], runs["ours"], key) for key in ("ms", "cost")}})
    return rows


def format_table(rows: List[dict]) -> str:
    header = (f"{'backbone':28s} {'size':>5s} {'mode':18s} {'ours ms':>9s} {'stock ms':>9s} {'stock/ours':>10s} "
              f"{'(eq. speed)':>11s} {'eq. range':>10s} {'ours MiB':>9s} {'stock MiB':>9s} {'stock/ours':>10s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ours, stock, equal = r["ours"], r["stock"], r["ratios"]["cost"]
        name = f"{r['task']}: ours vs {TASKS[r['task']][0]}"
        lines.append(f"{name:28s} {r['size']:5d} {r['mode']:18s} {ours['ms']:9.1f} {stock['ms']:9.1f} "
                     f"{statistics.median(r['ratios']['ms']):10.2f} {statistics.median(equal):11.2f} "
                     f"{f'{equal[0]:.2f}-{equal[-1]:.2f}':>10s} "
                     f"{ours['mib']:9.0f} {stock['mib']:9.0f} {stock['mib'] / max(ours['mib'], 1e-9):10.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--arch", default="base", choices=["tiny", "small", "base", "large", "huge"])
    parser.add_argument("--size", type=int, default=None,
                        help="image side (default: each task's training size, det 1024 and seg 512)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="bf16", choices=list(AMP), help="autocast dtype on CUDA (CPU runs fp32)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--iters", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="measure ours and stock in turn this many times")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    rows = benchmark(args)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = f"{args.amp} autocast" if device.type == "cuda" and AMP[args.amp] else "fp32"
    print(f"\nViT-{args.arch} backbones, batch {args.batch}, {where}, {precision}, torch {torch.__version__}; "
          f"median of {args.iters} steps, {args.rounds} round{'s' * (args.rounds > 1)}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
