"""LARS against the reference's update written out by hand and against timm's Lars; top-1/top-5 on hand-made logits;
unreadable images counted."""
import importlib
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.optim import Lars as TimmLars
from torch import nn
from torch.utils.data import DataLoader

from mae_transfer.cls import LARS, evaluate
from mae_transfer.data.classification import build_dataset, classification_transform
from mae_transfer.engine import Precision


def test_lars_step_is_the_references_update_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    b.grad = torch.tensor([2.0, 0.0])
    opt.step()
    d = w.grad + 0.1 * torch.tensor([[3.0, 0.0], [0.0, 4.0]])       # [[.3, 1], [1, .4]]
    d_norm = math.sqrt(0.09 + 1 + 1 + 0.16)                          # 1.5
    step1 = d * (0.01 * 5.0 / d_norm)
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.5 * step1)
    torch.testing.assert_close(b.data, torch.tensor([0.0, -1.0]))  # 1-D: no decay, no trust ratio: b - lr * g
    # second step: momentum mu = 0.9 * mu + d
    w0 = w.data.clone()
    b.grad = torch.tensor([2.0, 0.0])
    opt.step()
    torch.testing.assert_close(b.data, torch.tensor([0.0, -1.0]) - 0.5 * (0.9 * torch.tensor([2.0, 0.0])
                                                                          + torch.tensor([2.0, 0.0])))
    d2 = w.grad + 0.1 * w0
    step2 = 0.9 * step1 + d2 * (0.01 * w0.norm() / d2.norm())
    torch.testing.assert_close(w.data, w0 - 0.5 * step2)


def test_lars_matches_timm_without_weight_decay():
    """With weight decay 0, timm's Lars in always-adapt mode on matrices and plain mode on vectors is the same."""
    torch.manual_seed(0)
    ours = nn.Linear(6, 4)
    theirs = nn.Linear(6, 4)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = LARS(ours.parameters(), lr=0.3, weight_decay=0.0)
    opt_theirs = TimmLars([{"params": [theirs.weight], "always_adapt": True}, {"params": [theirs.bias]}],
                          lr=0.3, momentum=0.9, eps=0.0)
    for _ in range(3):
        x = torch.randn(5, 6)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)


def test_top1_top5_and_loss_on_hand_made_logits():
    # 7 classes; the true class's rank per sample: 1, 3, 6, 1, 5, 7 (7 = last)
    logits = torch.tensor([
        [9, 1, 2, 3, 4, 5, 6], [1, 9, 8, 7, 2, 3, 4], [7, 6, 5, 4, 3, 2, 1],
        [0, 0, 5, 0, 0, 0, 1], [1, 2, 3, 4, 5, 6, 7], [6, 5, 4, 3, 2, 1, 0]], dtype=torch.float32)
    target = torch.tensor([0, 3, 5, 2, 2, 6])
    # unequal batches: totals must still be exact; every image read (no unreadable ones)
    batches = [(logits[:4], target[:4], torch.zeros(4)), (logits[4:], target[4:], torch.zeros(2))]
    metrics = evaluate(nn.Identity(), batches, Precision("none", torch.device("cpu")), show_progress=False)
    assert metrics["top1"] == pytest.approx(100 * 2 / 6)   # samples 0 and 3
    assert metrics["top5"] == pytest.approx(100 * 4 / 6)   # ranks 1, 3, 1, 5
    loss = sum(torch.logsumexp(row, 0) - row[t] for row, t in zip(logits, target)) / 6
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert (metrics["images"], metrics["unreadable_images"]) == (6, 0)


def test_hit_counts_are_exact_where_the_percentage_is_not_round():
    # 1 of 3 is 33.333..%, which float32 keeps a hair under 1/3: turned back into a count it must still be 1
    logits = torch.eye(3)[[0, 0, 0]] * 5  # every sample predicts class 0
    batches = [(logits, torch.tensor([0, 1, 2]), torch.zeros(3)),  # 1 of 3, then 2 of 2
               (logits[:2], torch.tensor([0, 0]), torch.zeros(2))]
    metrics = evaluate(nn.Identity(), batches, Precision("none", torch.device("cpu")), show_progress=False)
    assert (metrics["top1"], metrics["top5"], metrics["images"]) == (pytest.approx(60.0), pytest.approx(100.0), 5)


def test_unreadable_images_are_counted_and_summed_over_processes(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / "val" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(tmp_path / "val" / "a" / f"{i}.png")
    (tmp_path / "val" / "a" / "1.png").write_bytes(b"not an image")  # replaced by 2.png, which then counts twice
    loader = DataLoader(build_dataset("imagefolder", tmp_path, "val", classification_transform(False, 16)),
                        batch_size=2)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 3 logits: the channel means
    cpu = Precision("none", torch.device("cpu"))
    metrics = evaluate(net, loader, cpu, show_progress=False)
    assert (metrics["images"], metrics["unreadable_images"]) == (3, 1)
    # --dist_eval: as if a second process had evaluated the same shard, every total doubles
    monkeypatch.setattr(importlib.import_module("mae_transfer.cls.evaluate"), "all_reduce", lambda t: t.mul_(2))
    metrics = evaluate(net, loader, cpu, sharded=True, show_progress=False)
    assert (metrics["images"], metrics["unreadable_images"]) == (6, 2)
