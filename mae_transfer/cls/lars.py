"""LARS as the MAE linear-probing recipe uses it (SGD with momentum and a layer-wise trust ratio).

Not timm.optim.Lars, whose update differs from the reference's in two ways that change results: timm scales by
trust_coeff * |w| / (|g| + wd * |w|), the reference by trust_coeff * |w| / |g + wd * w| (the norm of the decayed
gradient); and timm adapts every parameter of a group (or none, when its weight decay is 0 and always_adapt is off),
whereas the reference adapts and decays exactly the parameters with ndim > 1, leaving biases and norm parameters to
plain momentum SGD. With weight decay 0 and 2-D weights the two agree, which the tests check.
"""
import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """For each parameter p with gradient g, per step:

        d  = g + weight_decay * p,  d *= trust_coefficient * |p| / |d|   (only if p.ndim > 1 and both norms > 0)
        mu = momentum * mu + d                                             (mu starts at 0)
        p -= lr * mu
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or momentum < 0 or trust_coefficient < 0:
            raise ValueError(f"LARS: lr, weight_decay, momentum and trust_coefficient must be >= 0, got "
                             f"{lr}, {weight_decay}, {momentum}, {trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((p_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
