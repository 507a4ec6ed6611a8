"""Numeric precision of a training step: autocast on CUDA (bf16, or fp16 with a gradient scaler), fp32 elsewhere."""
from contextlib import AbstractContextManager
from typing import Iterable, Optional

import torch

__all__ = ["AMP_MODES", "Precision"]

AMP_MODES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast context and backward/optimizer step for one `--amp` mode on one device.

    'auto' picks bf16 on a CUDA GPU that computes in it natively (no loss scaling needed, and MAE's norm-pixel
    targets are safe in it), fp16 on older GPUs (where bf16 is emulated and SDPA's fused kernels refuse it), and fp32
    on other devices. fp16 needs a GradScaler, which skips the update of any step whose gradients overflowed.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode == "auto" and device.type != "cuda":
            mode = "none"
        elif mode == "auto":  # bf16 where the GPU computes in it (Ampere on), else fp16 as the reference on V100
            mode = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        if mode not in AMP_MODES:
            raise ValueError(f"--amp must be one of auto, {', '.join(AMP_MODES)}; got {mode!r}")
        if mode == "fp16" and device.type != "cuda":
            raise ValueError(f"--amp fp16 needs a CUDA device (got {device.type}); use --amp none or bf16")
        self.mode = mode
        self.device = device
        self.dtype = AMP_MODES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, update: bool = True,
                 clip_grad: Optional[float] = None, parameters: Iterable[torch.nn.Parameter] = ()) -> None:
        """Backpropagate `loss`; if `update`, clip (optionally), step the optimizer and clear the gradients."""
        self.scaler.scale(loss).backward()
        if not update:
            return
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:  # a disabled scaler saves {}; keep our own defaults then
            self.scaler.load_state_dict(state)
