import argparse
import json
import math
from contextlib import nullcontext

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mae_transfer.engine import (BatchPlan, DistInfo, NonFiniteLossError, Precision, RunLog, adamw, open_run_log,
                                 param_groups, train_one_epoch, warmup_cosine)
from mae_transfer.engine import logging as engine_logging

CPU = torch.device("cpu")


def _regression(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    return model, x, y


def mse_step(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y), {"samples": len(x)}


def _train(model, batches, *, accum_iter, batch_size, epochs=1, sgd=False, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else adamw(param_groups(model, 0.05), lr=0.1)
    ipe = len(batches)
    sched = warmup_cosine(opt, epochs=epochs + 1, warmup_epochs=1, iters_per_epoch=ipe)
    results = []
    for epoch in range(epochs):
        results.append(train_one_epoch(model, mse_step, batches, opt, sched, Precision("none", CPU), epoch=epoch,
                                       iters_per_epoch=ipe, batch_size=batch_size, accum_iter=accum_iter, **kwargs))
    return results


def test_gradient_accumulation_equals_the_large_batch():
    big, x, y = _regression()
    small, _, _ = _regression()
    # Plain SGD: its step is proportional to the gradient, so a micro-batch gradient left unscaled (twice the
    # large-batch one) shows; AdamW's update is nearly scale-free and would hide it.
    _train(big, [(x[:8], y[:8]), (x[8:], y[8:])], accum_iter=1, batch_size=8, epochs=2, sgd=True)
    # Same samples, in micro-batches of 4 accumulated in pairs: the same two optimizer steps per epoch.
    results = _train(small, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)], accum_iter=2, batch_size=4,
                     epochs=2, sgd=True)
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[-1].counts == {"samples": 16} and results[-1].iteration == 8


class _TwoParameters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))


def _linear_step(model, g):
    """loss = g . (a, b), whose gradient is g itself."""
    return g[0] * model.a.sum() + g[1] * model.b.sum(), {}


@pytest.mark.parametrize("batches, accum_iter, clip, update", [
    # ||g|| = 5 over both parameters together: g * 2 / 5 (clipping each parameter alone would give (2, 2))
    ([(3.0, 4.0)], 1, 2.0, (1.2, 1.6)),
    ([(3.0, 4.0)], 1, 10.0, (3.0, 4.0)),  # under the limit: untouched
    # micro-batch gradients (3, 0) and (0, 4) after the 1/accum_iter scaling: clipped once, as their sum (3, 4)
    # (clipping each would give (2, 2))
    ([(6.0, 0.0), (0.0, 8.0)], 2, 2.0, (1.2, 1.6)),
    # the averaged gradient's norm, 5, is under 7.5; the unaveraged sum's, 10, is not
    ([(6.0, 0.0), (0.0, 8.0)], 2, 7.5, (3.0, 4.0)),
])
def test_clip_grad_clips_the_accumulated_gradient_norm(batches, accum_iter, clip, update):
    model = _TwoParameters()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is exactly -gradient
    constant_lr = type("ConstantLR", (), {"step_update": lambda self, iteration: None})()
    train_one_epoch(model, _linear_step, [torch.tensor(g) for g in batches], opt, constant_lr,
                    Precision("none", CPU), epoch=0, iters_per_epoch=len(batches), batch_size=1,
                    accum_iter=accum_iter, clip_grad=clip)
    torch.testing.assert_close(torch.cat([model.a, model.b]).detach(), -torch.tensor(update))


def test_non_finite_loss_names_its_step_even_between_logging_steps():
    model, x, y = _regression()
    y = y.clone()
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)]
    batches[5] = (batches[5][0], torch.full_like(batches[5][1], math.nan))
    with pytest.raises(NonFiniteLossError, match=r"at step 5 \(epoch 0, iteration 5\)") as err:
        _train(model, batches, accum_iter=1, batch_size=2, log_every=4)  # checked after iterations 4 and 8
    assert err.value.iteration == 5 and math.isnan(err.value.value)


def _diverge_on_one_rank(rank: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, x, y = _regression()
        batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)]
        if rank == 1:  # only this process's loss at step 5 is NaN
            batches[5] = (batches[5][0], torch.full_like(batches[5][1], math.nan))
        try:
            _train(model, batches, accum_iter=1, batch_size=2, log_every=4, sgd=True)
        except NonFiniteLossError as err:
            results[rank] = (err.iteration, err.value, str(err))
    finally:
        torch.distributed.destroy_process_group()


def test_a_loss_non_finite_on_one_process_stops_every_process_naming_it(tmp_path):
    """Rank 0's own loss at step 5 is finite; both processes stop there and report the run's loss, which is not."""
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.spawn(_diverge_on_one_rank, args=(str(tmp_path / "rendezvous"), results), nprocs=2)
        results = dict(results)
    assert sorted(results) == [0, 1]
    for iteration, value, message in results.values():
        assert iteration == 5 and math.isnan(value)
        assert message.startswith("loss is nan at step 5 (epoch 0, iteration 5)")


def test_non_finite_weights_after_the_last_update_of_an_epoch_stop_the_run():
    """A finite loss whose gradient is not (torch.where's gradient through the unselected sqrt of a negative number
    is NaN): the epoch's last update spoils the weights, and no later loss would show it before the checkpoint."""
    model, x, y = _regression()
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)]

    def step(model, batch):
        loss, counts = mse_step(model, batch)
        if batch[0] is batches[-1][0]:
            w = model.weight.sum()
            loss = loss + torch.where(w > -1e9, 0.0 * w, torch.sqrt(-w.abs() - 1))
        return loss, counts

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, epochs=2, warmup_epochs=1, iters_per_epoch=4)
    with pytest.raises(NonFiniteLossError, match=r"weights are non-finite after the update at step 3 \(epoch 0, "
                                                 r"iteration 3\)"):
        train_one_epoch(model, step, batches, opt, sched, Precision("none", CPU), epoch=0, iters_per_epoch=4,
                        batch_size=4)
    assert not torch.isfinite(model.weight).all()


def test_logging_steps_epoch_end_and_max_iterations(tmp_path):
    model, x, y = _regression()
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)]
    log = RunLog(tmp_path / "log.jsonl", tmp_path / "tb")
    results = _train(model, batches, accum_iter=2, batch_size=2, epochs=2, log=log, log_every=3,
                     max_iterations=12)
    log.close()
    assert [r.iterations for r in results] == [8, 4] and results[1].stopped and not results[0].stopped
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # Logged after iterations 3, 6, 8 (epoch end) of epoch 0, then 3 and the stop at 4 in epoch 1.
    assert [r["step"] for r in records] == [3, 6, 8, 11, 12]
    assert all(r["kind"] == "step" and math.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_logged_losses_are_the_means_of_their_windows_and_the_epoch(tmp_path):
    """Batch i has loss i (plus a zero term that gives it a gradient): with accum_iter 2 and a log every 3
    iterations the windows are {0,1,2}, {3,4,5}, {6,7}; the epoch's loss is the mean of 0..7. Losses are
    logged as computed, not as scaled for accumulation."""
    model = _TwoParameters()
    batches = [torch.tensor(float(i)) for i in range(8)]

    def step(model, value):
        return value + 0.0 * model.a.sum(), {}

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, epochs=1, warmup_epochs=0, iters_per_epoch=8)
    log = RunLog(tmp_path / "log.jsonl", None)
    result = train_one_epoch(model, step, batches, opt, sched, Precision("none", CPU), epoch=0, iters_per_epoch=8,
                             batch_size=1, accum_iter=2, log=log, log_every=3)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(3, 1.0), (6, 4.0), (8, 6.5)]
    assert result.loss == 3.5 and result.iteration == 8


def test_tensorboard_goes_to_log_dir_with_kind_tags_and_json_lines_stay_strict_json(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), log_dir=str(tmp_path / "tb"), start_epoch=0,
                              model="m")
    plan = BatchPlan(batch_size=4, accum_iter=1, world_size=1, iters_per_epoch=3)
    log = open_run_log(args, plan, Precision("none", CPU), DistInfo(0, 0, 1, CPU), resumed_from=None)
    log.write("step", 3, {"loss": 0.5, "lr": 1e-3})
    log.write("epoch", 3, {"loss": float("nan"), "images_per_s": 7.0})
    log.close()
    assert not list((tmp_path / "out").glob("events.*")) and (tmp_path / "out" / "log.jsonl").exists()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"step/loss", "step/lr", "epoch/images_per_s"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("step/loss")] == [(3, 0.5)]
    lines = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON")) for line in lines]
    assert records[-1]["loss"] == "nan"


def test_only_the_main_process_records_the_run(tmp_path, monkeypatch):
    # The record asks git and the hardware: on the other ranks of a large job it would only cost their start.
    def asked(dist):
        raise AssertionError("a non-main rank built the run record")
    monkeypatch.setattr(engine_logging, "_environment", asked)
    args = argparse.Namespace(output_dir=str(tmp_path), log_dir=None, start_epoch=0)
    plan = BatchPlan(batch_size=4, accum_iter=1, world_size=2, iters_per_epoch=3)
    log = open_run_log(args, plan, Precision("none", CPU), DistInfo(1, 1, 2, CPU), resumed_from=None)
    log.close()
    assert not (tmp_path / "log.jsonl").exists()


def test_precision_modes():
    assert Precision("auto", CPU).dtype is None and not Precision("auto", CPU).scaler.is_enabled()
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA device"):
        Precision("fp16", CPU)
    with pytest.raises(ValueError, match="--amp must be one of"):
        Precision("fp8", CPU)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Precision("bf16", CPU).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Precision("none", CPU).autocast():
        assert (a @ b).dtype == torch.float32
    bf16 = Precision("bf16", CPU)  # bf16 has fp32's range: no loss scaling, and nothing to save for it
    assert not bf16.scaler.is_enabled() and bf16.state_dict() == {}


def test_backward_without_update_accumulates_and_update_steps():
    model, x, y = _regression()
    opt = adamw(param_groups(model, 0.0), lr=0.1)
    precision = Precision("none", CPU)
    before = model.weight.detach().clone()
    precision.backward(mse_step(model, (x, y))[0], opt, update=False)
    first = model.weight.grad.clone()
    precision.backward(mse_step(model, (x, y))[0], opt, update=False)
    torch.testing.assert_close(model.weight.grad, 2 * first)
    assert torch.equal(model.weight, before)
    precision.backward(mse_step(model, (x, y))[0], opt, update=True)
    assert model.weight.grad is None and not torch.equal(model.weight, before)


@pytest.mark.parametrize("native_bf16, mode", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch, native_bf16, mode):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(
        including_emulation) or native_bf16)
    assert Precision("auto", torch.device("cuda")).mode == mode
    assert calls == [False]  # emulated bf16 (V100, T4) does not count


def test_gradient_sync_is_skipped_through_torch_compile_s_wrapper_of_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mae_transfer.engine import skip_gradient_sync
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(torch.nn.Linear(2, 2))
        for wrapped in (ddp, torch.compile(ddp)):  # compiling is lazy: nothing is compiled here
            with skip_gradient_sync(wrapped):
                assert not ddp.require_backward_grad_sync
            assert ddp.require_backward_grad_sync
        assert isinstance(skip_gradient_sync(torch.nn.Linear(2, 2)), nullcontext)  # no DDP: nothing to skip
    finally:
        dist.destroy_process_group()
