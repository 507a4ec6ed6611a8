import argparse
import random

import numpy as np
import pytest
import torch

from mae_transfer.checkpoints import CheckpointError
from mae_transfer.engine import (Precision, adamw, latest_checkpoint, load_state, param_groups, rng_state,
                                 save_state, set_rng_state)


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(1).tolist(), random.random()


def test_rng_state_round_trip_covers_torch_numpy_python():
    np.random.randn()  # leave a cached Gaussian in NumPy's state
    state = rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first


def test_a_cpu_run_on_a_gpu_machine_leaves_cuda_alone(monkeypatch):
    """Reading CUDA's generator starts a CUDA context (memory on GPU 0 for every process): a --device cpu run on a
    machine with GPUs must neither read nor set it."""
    def touched(*args):
        raise AssertionError("CUDA's generator was touched by a CPU run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", touched)
    monkeypatch.setattr(torch.cuda, "set_rng_state", touched)
    state = rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    return model, adamw(param_groups(model, 0.05), lr=1e-2)


def _train_step(model, opt):
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_saved_state_reloads_weights_only_and_continues_identically(tmp_path):
    model, opt = _model_and_optimizer(0)
    precision = Precision("none", torch.device("cpu"))
    for _ in range(3):
        _train_step(model, opt)
    path = tmp_path / "checkpoint-2.pth"
    save_state(path, model=model, optimizer=opt, precision=precision, epoch=2, iteration=30,
               args={"blr": 1.5e-4, "model": "mae_vit_tiny_patch16"}, write=True)
    raw = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert raw["epoch"] == 2 and raw["iteration"] == 30 and len(raw["rng"]) == 1

    _train_step(model, opt)  # the uninterrupted continuation
    expected = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt = _model_and_optimizer(1)  # different init: everything must come from the file
    state = load_state(path, model=fresh, optimizer=fresh_opt, precision=Precision("none", torch.device("cpu")))
    assert state["args"]["model"] == "mae_vit_tiny_patch16"
    _train_step(fresh, fresh_opt)  # same RNG draws for the batch, same Adam moments
    for a, b in zip(expected, fresh.parameters()):
        assert torch.equal(a, b)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    model, opt = _model_and_optimizer(0)
    precision = Precision("none", torch.device("cpu"))
    path = tmp_path / "checkpoint-0.pth"
    save_state(path, model=model, optimizer=opt, precision=precision, epoch=0, iteration=1, args={}, write=True)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_state(path, model=model, optimizer=opt, precision=precision, epoch=1, iteration=2,
                   args={"unpicklable": lambda: None}, write=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0.pth"]  # no temporary file left


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for name in ["checkpoint-2.pth", "checkpoint-10.pth", ".checkpoint-11.pth.x.tmp", "checkpoint-x.pth"]:
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10.pth"
    assert latest_checkpoint(tmp_path / "checkpoint-2.pth").name == "checkpoint-2.pth"
    with pytest.raises(FileNotFoundError, match="--resume"):
        latest_checkpoint(tmp_path / "missing")


def test_loading_a_weights_file_as_training_state_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    model, opt = _model_and_optimizer(0)
    with pytest.raises(CheckpointError, match="not a training state"):
        load_state(path, model=model, optimizer=opt, precision=Precision("none", torch.device("cpu")))


def test_resuming_into_another_model_names_the_saved_flags(tmp_path):
    model, opt = _model_and_optimizer(0)
    precision = Precision("none", torch.device("cpu"))
    path = tmp_path / "checkpoint-0.pth"
    save_state(path, model=model, optimizer=opt, precision=precision, epoch=0, iteration=1,
               args={"model": "mae_vit_tiny_patch16", "input_size": 64, "nb_classes": None}, write=True)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    with pytest.raises(CheckpointError, match=r"checkpoint-0\.pth: its model does not fit this run's \(it was saved "
                                              r"by a run with --model mae_vit_tiny_patch16 --input_size 64\)"):
        load_state(path, model=wider, optimizer=adamw(param_groups(wider, 0.05), lr=1e-2), precision=precision)


def test_resuming_with_other_optimizer_groups_names_the_saved_flags(tmp_path):
    model, opt = _model_and_optimizer(0)
    precision = Precision("none", torch.device("cpu"))
    path = tmp_path / "checkpoint-2.pth"
    save_state(path, model=model, optimizer=opt, precision=precision, epoch=2, iteration=6,
               args={"mode": "partial", "partial_blocks": 2, "layer_decay": None}, write=True)
    one_group = torch.optim.AdamW(model.parameters(), lr=1e-2)  # the saved optimizer has decay / no-decay groups
    with pytest.raises(CheckpointError, match=r"checkpoint-2\.pth: its optimizer does not fit this run's \(it was "
                                              r"saved by a run with --mode partial --partial_blocks 2\)"):
        load_state(path, model=model, optimizer=one_group, precision=precision)


def test_a_resumed_optimizer_keeps_this_runs_hyperparameters_and_the_saved_moments(tmp_path):
    """torch's load_state_dict takes the saved groups' settings: a --weight_decay changed at a resumption (which
    resume() lists as changed) would silently not apply."""
    model, opt = _model_and_optimizer(0)
    precision = Precision("none", torch.device("cpu"))
    _train_step(model, opt)
    path = tmp_path / "checkpoint-0.pth"
    save_state(path, model=model, optimizer=opt, precision=precision, epoch=0, iteration=1, args={}, write=True)
    fresh, _ = _model_and_optimizer(1)
    fresh_opt = adamw(param_groups(fresh, 0.1), lr=1e-2, betas=(0.8, 0.9))
    load_state(path, model=fresh, optimizer=fresh_opt, precision=precision)
    assert [g["weight_decay"] for g in fresh_opt.param_groups] == [0.0, 0.1]
    assert all(g["betas"] == (0.8, 0.9) and g["fused"] for g in fresh_opt.param_groups)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])


def _reference_checkpoint(path, weights, optimizer_state, **args):
    """What the MAE reference's misc.save_model writes (args: an argparse.Namespace)."""
    torch.save({"model": weights, "optimizer": optimizer_state, "epoch": 4, "scaler": {},
                "args": argparse.Namespace(**args)}, path)


class _Net(torch.nn.Module):
    """Linear, LayerNorm, Linear, registered in `order`: models_vit.py registers fc_norm after the head."""

    def __init__(self, order):
        super().__init__()
        torch.manual_seed(0)
        layers = {"a": torch.nn.Linear(4, 8), "norm": torch.nn.LayerNorm(8), "b": torch.nn.Linear(8, 1)}
        for name in order:
            self.add_module(name, layers[name])

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def _same_by_name(a, b):
    params = dict(b.named_parameters())
    for name, value in a.named_parameters():
        assert torch.equal(value, params[name]), name


def _same_state_by_name(a, a_opt, b, b_opt, key):
    """Each parameter of `a` has in `a_opt` the `key` state its namesake in `b` has in `b_opt`."""
    params = dict(b.named_parameters())
    for name, value in a.named_parameters():
        assert torch.equal(a_opt.state[value][key], b_opt.state[params[name]][key]), name


def test_a_reference_checkpoint_resumes_its_moments_by_name_in_its_own_order(tmp_path):
    """The reference numbers its optimizer's parameters in its model's order (fc_norm after the head): matched by
    position, as torch does, the norm's moments would go to the second Linear. Continued one step, the resumed model
    is where the reference's own continues."""
    theirs = _Net(["a", "b", "norm"])
    their_opt = adamw(param_groups(theirs, 0.05), lr=1e-2)
    _train_step(theirs, their_opt)
    path = tmp_path / "checkpoint-4.pth"
    _reference_checkpoint(path, theirs.state_dict(), their_opt.state_dict(), model="mae_vit_tiny_patch16", epochs=9)
    ours = _Net(["a", "norm", "b"])
    our_opt = adamw(param_groups(ours, 0.05), lr=1e-2)
    state = load_state(path, model=ours, optimizer=our_opt, precision=Precision("none", torch.device("cpu")),
                       expected={"model": "mae_vit_tiny_patch16", "masking": "random"},
                       unrecorded={"masking": "random"})
    assert state["epoch"] == 4 and state["args"] == {"masking": "random", "model": "mae_vit_tiny_patch16", "epochs": 9}
    _same_by_name(theirs, ours)
    _same_state_by_name(theirs, their_opt, ours, our_opt, "exp_avg_sq")
    for model, opt in ((theirs, their_opt), (ours, our_opt)):
        torch.manual_seed(1)
        _train_step(model, opt)
    _same_by_name(theirs, ours)
    with pytest.raises(CheckpointError, match="saved by a run with masking=random; this run has masking=block"):
        load_state(path, model=ours, optimizer=our_opt, precision=Precision("none", torch.device("cpu")),
                   expected={"masking": "block"}, unrecorded={"masking": "random"})


def test_a_reference_optimizer_group_of_a_kind_this_run_lacks_is_refused_by_name(tmp_path):
    """One group decaying every parameter, where this run decays matrices only: nothing to match it by."""
    theirs, ours = _Net(["a", "norm", "b"]), _Net(["a", "norm", "b"])
    one_group = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.01)
    _train_step(theirs, one_group)
    path = tmp_path / "checkpoint-4.pth"
    _reference_checkpoint(path, theirs.state_dict(), one_group.state_dict())
    with pytest.raises(CheckpointError, match=r"MAE reference's scripts whose optimizer group 0 \(weight decay "
                                              r"0\.01\) holds a parameter of shape \(8,\) where this run has none "
                                              r"of that kind left"):
        load_state(path, model=ours, optimizer=adamw(param_groups(ours, 0.05), lr=1e-2),
                   precision=Precision("none", torch.device("cpu")))


def test_a_reference_linear_probe_with_weight_decay_resumes_its_momenta_by_name(tmp_path):
    """main_linprobe.py's LARS holds the head in one group of its --weight_decay; ours splits it by decay (LARS, its
    and ours, decays exactly the parameters with ndim > 1 either way). Same flags: it resumes, and continues as the
    reference's own run."""
    from mae_transfer.cls import LARS
    theirs, ours = _Net(["a", "norm", "b"]), _Net(["a", "norm", "b"])
    their_opt = LARS(theirs.parameters(), lr=0.1, weight_decay=0.05)
    _train_step(theirs, their_opt)
    path = tmp_path / "checkpoint-4.pth"
    _reference_checkpoint(path, theirs.state_dict(), their_opt.state_dict(), weight_decay=0.05)
    our_opt = LARS(param_groups(ours, 0.05), lr=0.1, weight_decay=0.05)
    load_state(path, model=ours, optimizer=our_opt, precision=Precision("none", torch.device("cpu")))
    _same_state_by_name(theirs, their_opt, ours, our_opt, "mu")
    for model, opt in ((theirs, their_opt), (ours, our_opt)):
        torch.manual_seed(1)
        _train_step(model, opt)
    _same_by_name(theirs, ours)


def test_a_reference_run_without_weight_decay_resumes_its_moments_by_name(tmp_path):
    """At weight decay 0 timm 0.3.2's add_weight_decay (the reference's pretraining) still makes a no-decay group
    (1-D parameters, in order) and a decay group; today's timm makes one. Kinds do not tell them apart: shapes do."""
    theirs, ours = _Net(["a", "norm", "b"]), _Net(["a", "norm", "b"])
    params = list(theirs.named_parameters())
    their_opt = torch.optim.AdamW([{"params": [p for n, p in params if p.ndim <= 1], "weight_decay": 0.0},
                                   {"params": [p for n, p in params if p.ndim > 1], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    _train_step(theirs, their_opt)
    path = tmp_path / "checkpoint-4.pth"
    _reference_checkpoint(path, theirs.state_dict(), their_opt.state_dict())
    our_opt = adamw(param_groups(ours, 0.0), lr=1e-2)
    assert len(our_opt.param_groups) == 1
    load_state(path, model=ours, optimizer=our_opt, precision=Precision("none", torch.device("cpu")))
    _same_state_by_name(theirs, their_opt, ours, our_opt, "exp_avg")
