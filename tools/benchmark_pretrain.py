"""Pretraining throughput: our MAE step, the paper's Table 2 baseline, and HuggingFace transformers, in one run.

    python tools/benchmark_pretrain.py --model mae_vit_base_patch16 --batch_size 8            # CPU, fp32
    python tools/benchmark_pretrain.py --model mae_vit_large_patch16 --batch_size 128 --compile  # GPU, bf16

Every row times the same full training step (forward, backward, fused AdamW update; bf16 autocast on CUDA, fp32 on
CPU) on the same random batch, after warm-up steps, and reports the median:
- ours: the asymmetric MAE (the encoder sees only the visible 25% of patches);
- ours, encoder w/ mask tokens: the same model with the encoder run on all patches, masked ones replaced by a
  mask token, and the decoder on the encoder's output (the paper's Table 2 baseline); the ratio of their step
  times is this machine's Table 2 speed-up;
- transformers ViTMAEForPreTraining with the same configuration (SDPA attention, eager; optional dependency).
Model FLOPs are counted by torch.utils.flop_counter on one step of each model (attention through the math kernel,
which the counter sees). After every timed step one large matmul is timed too: MFU is the model's FLOPs over the step
time x that matmul rate (the machine's practical peak at that moment), the median over steps, so a shared or throttled
machine whose speed drifts between rows still gives comparable rows; ratios are printed both raw and at equal
matmul speed. Each row runs in a fresh process; its memory is the peak allocated on the GPU, or on CPU the growth of
its peak resident set over its size before training. The rows are measured in --rounds rounds (every other one in
reverse order); the table gives medians over rounds, and each ratio is the median of the ratios within a round, with
their range: one run per row can land a few percent either side of 1.0 on a shared 2-core VM. `--profile N` also
prints, for each row, torch.profiler's operators (and CUDA kernels) over N more steps in the first round, by self
time.
"""
import argparse
import multiprocessing
import os
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mae_transfer.engine import adamw, param_groups, positive_int
from mae_transfer.models import MODELS, MaskedAutoencoderViT, apply_masking, create_model, masking_noise

Step = Callable[[torch.Tensor], torch.Tensor]  # images -> loss


class EncoderWithMaskTokens(nn.Module):
    """Table 2's baseline on our model's own modules: the encoder processes every patch, a learned mask token
    standing in for each removed one, and the decoder takes the encoder's full output (no unshuffling)."""

    def __init__(self, mae: MaskedAutoencoderViT):
        super().__init__()
        self.mae = mae
        self.mask_token = nn.Parameter(torch.empty(1, 1, mae.embed_dim).normal_(std=0.02))

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> torch.Tensor:
        m = self.mae
        x = m.patch_embed(imgs)
        noise = masking_noise(m.masking, x.shape[0], m.grid_size, mask_ratio, device=x.device)
        _, mask, _ = apply_masking(x, mask_ratio, noise)
        removed = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - removed) + self.mask_token.to(x.dtype) * removed + m.pos_embed[:, 1:]
        cls = (m.cls_token + m.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = m.norm(m.blocks(torch.cat([cls, x], dim=1)))
        x = m.decoder_embed(x) + m.decoder_pos_embed
        for blk in m.decoder_blocks:
            x = blk(x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]
        return m.forward_loss(imgs, pred, mask)


def transformers_mae(mae: MaskedAutoencoderViT) -> nn.Module:
    """HuggingFace's ViTMAEForPreTraining with the configuration of `mae`."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    block, dblock = mae.blocks[0], mae.decoder_blocks[0]
    config = ViTMAEConfig(
        hidden_size=mae.embed_dim, num_hidden_layers=len(mae.blocks), num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, image_size=mae.patch_embed.img_size[0],
        patch_size=mae.patch_size, qkv_bias=True, layer_norm_eps=1e-6,
        decoder_hidden_size=mae.decoder_embed.out_features, decoder_num_hidden_layers=len(mae.decoder_blocks),
        decoder_num_attention_heads=dblock.attn.num_heads, decoder_intermediate_size=dblock.mlp.fc1.out_features,
        mask_ratio=0.75, norm_pix_loss=mae.norm_pix_loss, attn_implementation="sdpa")
    return ViTMAEForPreTraining(config)


def make_step(model: nn.Module, loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], device: torch.device,
              amp: Optional[torch.dtype], compile_model: bool) -> Step:
    """A full training step of `model`: forward and backward under autocast, then fused AdamW (MAE groups)."""
    model.to(device).train()
    optimizer = adamw(param_groups(model, 0.05), lr=1e-4, device=device)
    run = torch.compile(model) if compile_model else model

    def step(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_of(run, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulProbe:
    """How fast this machine multiplies large matrices right now, in FLOP/s: one square matmul, timed.

    Timed after every benchmark step it is that step's yardstick. A shared VM's speed drifts by tens of percent over
    minutes; step time x probe rate (the step's cost in matmul-peak FLOPs) does not, so rows measured minutes apart
    stay comparable."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        # Large enough to be compute-bound; on the 2-core CPU VM 3072 was the fastest square size from 1024 to 4096.
        n = 8192 if device.type == "cuda" else 3072
        self.device, self.flops = device, 2 * n ** 3
        self.a, self.b, self.out = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
        self.nbytes = 3 * self.a.nbytes  # held for the whole benchmark: a memory figure must leave it out
        self()  # warm-up: first-call allocations and kernel selection

    def __call__(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        sync(self.device)
        return self.flops / (time.perf_counter() - t0)


def count_flops(loss_of: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """FLOPs of one forward + backward, attention included (the math SDPA kernel is made of counted matmuls)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss_of(images).backward()
    return float(counter.get_total_flops())


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_step(step: Step, images: torch.Tensor, warmup: int, steps: int,
              probe: MatmulProbe) -> Tuple[List[float], List[float]]:
    """Seconds of each of `steps` steps after `warmup` untimed ones, and the `probe`'s matmul rate after each."""
    device = images.device
    for _ in range(warmup):
        step(images)
    sync(device)
    times: List[float] = []
    rates: List[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(images)
        sync(device)
        times.append(time.perf_counter() - t0)
        rates.append(probe())
    if not torch.isfinite(loss):
        raise FloatingPointError("the benchmark step produced a non-finite loss")
    return times, rates


def print_profile(row: str, step: Step, images: torch.Tensor, steps: int) -> None:
    """Where `steps` more steps of `row` spend their time: torch.profiler's operators (and on CUDA its kernels) by
    self time on the device that runs them, the top 15."""
    cuda = images.device.type == "cuda"
    sync(images.device)
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(images)
        sync(images.device)
        wall = time.perf_counter() - t0
    print(f"\nrow {row!r}: {steps} profiled steps, {1e3 * wall / steps:.1f} ms each (the profiler slows them)")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=15))


ROWS = {
    "ours": "ours (encoder on visible patches)",
    "mask_tokens": "ours, encoder w/ mask tokens",
    "transformers": "transformers {version} ViTMAE",
}


def measure(row: str, args: argparse.Namespace, device: torch.device, profile_steps: int = 0) -> Dict[str, float]:
    """One row, meant to run in a fresh process: its peak memory is then its own. `profile_steps` more steps are
    profiled after the timed ones (print_profile)."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    mae = create_model(args.model, img_size=args.input_size, norm_pix_loss=True)
    if row == "ours":
        model, loss_of, compile_model = mae, (lambda m, x: m(x, mask_ratio=0.75)[0]), args.compile
    elif row == "mask_tokens":
        model, loss_of, compile_model = EncoderWithMaskTokens(mae), (lambda m, x: m(x, mask_ratio=0.75)), args.compile
    else:
        model, loss_of, compile_model = transformers_mae(mae), (lambda m, x: m(pixel_values=x).loss), False
    flops = count_flops(lambda x: loss_of(model, x), images[:1].cpu()) * args.batch_size
    model.zero_grad(set_to_none=True)
    probe = MatmulProbe(device, amp or torch.float32)  # before the CPU baseline; subtracted on CUDA
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resident_bytes()
    step = make_step(model, loss_of, device, amp, compile_model)
    times, rates = time_step(step, images, args.warmup, args.steps, probe)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) - probe.nbytes
    else:  # the process's peak resident set (ru_maxrss, KiB) over its size before training started
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    if profile_steps:
        print_profile(row, step, images, profile_steps)
    # cost: each step in matmul-peak FLOPs (seconds x the machine's matmul rate right after it)
    return dict(flops=flops, step_s=statistics.median(times), peak=statistics.median(rates),
                cost=statistics.median(t * r for t, r in zip(times, rates)), memory=memory)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16",
                        choices=sorted(n for n in MODELS if n.startswith("mae_")))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (not transformers')")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, all cores)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="what to measure; the first is the baseline of the ratios")
    parser.add_argument("--profile", type=positive_int, default=0, metavar="STEPS",
                        help="also profile this many steps of each row (in the first round) and print where their "
                             "time goes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every row this many times, in turn (medians and the ratios' range reported)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if device.type == "cuda" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    # Each row in a fresh process: peak memory is its own, and no row inherits another's allocator state. Rows run
    # in rounds, every other round in reverse order: a VM's speed drifts over minutes, and a ratio taken within a
    # round, between rows measured next to each other, drifts much less than rows measured once each.
    rounds: Dict[str, List[Dict[str, float]]] = {row: [] for row in args.rows}
    context = multiprocessing.get_context("spawn")
    for r in range(args.rounds):
        for row in args.rows if r % 2 == 0 else args.rows[::-1]:
            with context.Pool(1) as pool:
                rounds[row].append(pool.apply(measure, (row, args, device, args.profile if r == 0 else 0)))
    results = [dict(medians(rounds[row]), row=row) for row in args.rows]
    names = dict(ROWS)
    if "transformers" in args.rows:
        import transformers
        names["transformers"] = ROWS["transformers"].format(version=transformers.__version__)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\nMAE pretraining step: {args.model}, batch {args.batch_size}, {args.input_size}px, mask ratio 0.75, "
          f"{device.type} ({where}), {'bf16 autocast' if amp else 'fp32'}, fused AdamW"
          f"{', torch.compile (ours)' if args.compile else ''}, torch {torch.__version__}")
    print(f"MFU: model FLOP/s over the {amp or torch.float32} matmul peak measured after each step; every figure "
          f"is the median over {args.rounds} round{'s' * (args.rounds > 1)}\n")
    header = (f"{'':44s} {'images/s':>10s} {'step ms':>10s} {'peak mem GiB':>13s} {'GFLOP/img':>10s} "
              f"{'TFLOP/s':>9s} {'matmul peak':>12s} {'MFU':>6s}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{names[r['row']]:44s} {args.batch_size / r['step_s']:10.2f} {1e3 * r['step_s']:10.1f} "
              f"{r['memory'] / 2**30:13.2f} {r['flops'] / args.batch_size / 1e9:10.1f} "
              f"{r['flops'] / r['step_s'] / 1e12:9.3f} {r['peak'] / 1e12:12.3f} {100 * r['flops'] / r['cost']:5.1f}%")
    print()
    base = args.rows[0]
    for row in args.rows[1:]:
        what = {"mask_tokens": f"Table 2 speed-up (step time of encoder w/ mask tokens / {base})",
                "transformers": f"{base} / transformers (images/s)"}.get(row, names[row])
        raw, equal = (format_ratios(round_ratios(rounds[row], rounds[base], key)) for key in ("step_s", "cost"))
        print(f"{what}: {raw}; at equal matmul speed {equal}")


def medians(rounds: List[Dict[str, float]]) -> Dict[str, float]:
    """Each figure's median over the rounds of one row."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def round_ratios(rows: List[Dict[str, float]], base: List[Dict[str, float]], key: str) -> List[float]:
    """row[key] / base[key] within each round, sorted: their median is the ratio reported, their ends its range."""
    return sorted(r[key] / b[key] for r, b in zip(rows, base))


def format_ratios(ratios: List[float]) -> str:
    spread = f" (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}x{spread}"


if __name__ == "__main__":
    main()
