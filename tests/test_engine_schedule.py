import math

import pytest
import torch

from mae_transfer.engine import warmup_cosine


def reference_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The MAE reference's util/lr_sched.adjust_learning_rate, evaluated at a fractional epoch."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def _optimizer(lr):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.25}], lr=lr)


@pytest.mark.parametrize("t", [0, 1, 13, 20, 21, 33, 47, 69, 79])
def test_lr_at_iteration_equals_the_reference_formula(t):
    lr, min_lr, epochs, warmup, ipe = 2.4e-3, 1e-6, 8, 2, 10
    opt = _optimizer(lr)
    sched = warmup_cosine(opt, epochs=epochs, warmup_epochs=warmup, iters_per_epoch=ipe, min_lr=min_lr)
    sched.step_update(t)
    expected = reference_lr(t / ipe, lr, min_lr, warmup, epochs)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * expected, rel=1e-12, abs=1e-18)  # lr_scale applies


def test_a_run_shorter_than_its_warmup_warms_up_throughout_as_the_reference():
    lr, epochs, warmup, ipe = 1e-3, 2, 5, 3
    opt = _optimizer(lr)
    sched = warmup_cosine(opt, epochs=epochs, warmup_epochs=warmup, iters_per_epoch=ipe)
    for t in range(epochs * ipe):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(t / ipe, lr, 0.0, warmup, epochs), rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 5 / 15)  # the last of 6 iterations, 5 of 15 warmed up


def test_schedule_landmarks_by_hand():
    opt = _optimizer(1.0)
    sched = warmup_cosine(opt, epochs=3, warmup_epochs=1, iters_per_epoch=4, min_lr=0.1)
    lrs = []
    for t in range(12):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # linear warmup from 0
    assert lrs[4] == pytest.approx(1.0)  # peak when warmup ends
    assert lrs[8] == pytest.approx((1.0 + 0.1) / 2)  # half-way through the cosine
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # decreasing towards min_lr
    sched.step_update(12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("t", [1, 27, 28, 29, 30, 100, 150])
def test_a_fractional_warmup_follows_the_reference(t):
    # 0.29 epochs of 100 iterations is 29 iterations of warmup, though 0.29 * 100 is 28.999999999999996 in floats
    lr, epochs, warmup, ipe = 1.0, 2, 0.29, 100
    opt = _optimizer(lr)
    warmup_cosine(opt, epochs=epochs, warmup_epochs=warmup, iters_per_epoch=ipe).step_update(t)
    assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(t / ipe, lr, 0.0, warmup, epochs), rel=1e-9)
