"""Resumable training state: everything a run needs to continue as if it had never stopped.

Model, optimizer, gradient scaler, the epoch just completed, the iteration count (which is the schedule's
position) and every process's random-number generators (torch CPU and CUDA, NumPy, Python). The file holds only
tensors and plain containers, so it reloads with torch.load(weights_only=True), and it is written atomically: a run
killed while saving leaves the previous checkpoint untouched.

A training checkpoint of the MAE reference's scripts (misc.save_model: model, optimizer, epoch, scaler, args) resumes
too: its optimizer's moments are matched to our parameters by name, the schedule's position follows from its epoch,
as in the reference; it has no generator states to restore.
"""
import argparse
import math
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoints import CheckpointError, load_training_state, save_training_state
from .amp import Precision
from .distributed import all_gather_object, get_rank, get_world_size, is_main_process
from .loop import EpochResult

__all__ = ["rng_state", "set_rng_state", "save_state", "save_epoch", "load_state", "latest_checkpoint", "resume"]

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pth")
# What the MAE reference's misc.save_model writes besides 'scaler' and 'args' (no iteration count, no generators).
REFERENCE_KEYS = frozenset({"model", "optimizer", "epoch"})
# Flags that say where and how a run executes, not what it trains: they may change at a resumption unremarked.
RUN_MECHANICS = frozenset({"preset", "resume", "start_epoch", "output_dir", "log_dir", "data_path", "device",
                           "local_rank", "world_size", "dist_url", "num_workers", "pin_mem", "compile", "max_steps",
                           "save_every", "log_every", "batch_size", "accum_iter", "dist_eval"})


def rng_state(device: torch.device = torch.device("cpu")) -> Dict[str, Any]:
    """This process's generator states as tensors and tuples of ints; CUDA's only for a run on a GPU (reading it
    elsewhere would start a CUDA context on a GPU the run does not use)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this process's own device only: a resumed run may see another number of GPUs per process
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any], device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])


def save_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               epoch: int, iteration: int, args: Dict[str, Any], write: bool) -> None:
    """Save after `epoch` (0-based) completed, `iteration` data iterations in all.

    Collective: every process contributes its RNG state; only the one with `write` set writes the file.
    """
    rng = all_gather_object(rng_state(precision.device))
    if not write:
        return
    save_training_state(path, {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": precision.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "rng": rng,
        "args": args,
    })


def save_epoch(args: argparse.Namespace, epoch: int, result: EpochResult, *, iters_per_epoch: int, model: nn.Module,
               optimizer: torch.optim.Optimizer, precision: Precision, write: bool) -> Optional[Path]:
    """The end-of-epoch save of the reference's scripts: <--output_dir>/checkpoint-<epoch>.pth every --save_every
    epochs, after the last one, and where --max_steps stopped the run, of whole epochs only (a run resumes at an
    epoch boundary). Collective, as save_state. Returns the checkpoint's path, or None when none was due."""
    whole = result.iterations == iters_per_epoch
    if not (whole and (epoch % args.save_every == 0 or epoch + 1 == args.epochs or result.stopped)):
        return None
    path = Path(args.output_dir) / f"checkpoint-{epoch}.pth"
    save_state(path, model=model, optimizer=optimizer, precision=precision, epoch=epoch, iteration=result.iteration,
               args=vars(args), write=write)
    return path


def load_state(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
               expected: Optional[Dict[str, Any]] = None, unrecorded: Optional[Dict[str, Any]] = None
               ) -> Dict[str, Any]:
    """Restore a state saved by `save_state`, or by the MAE reference's scripts, into the given objects and this
    process's RNGs.

    `expected`: this run's values of the settings that define the model and what it learns. A state saved with
    other values is refused, naming them: a decoder with other head counts or other targets would load into tensors
    of the same shapes and silently train something else. A setting the state left unrecorded is compared with its
    value in `unrecorded` (what the reference's scripts fixed without a flag), or not at all.

    The optimizer's moments come from the state; its hyperparameters (weight decay, lr_scale, betas, which kernel)
    stay this run's, as its flags say (torch would take the saved ones, so a changed --weight_decay, which resume()
    reports as changed, would not apply).

    Returns the state (its 'epoch', 'iteration' and 'args' tell the caller where to continue; a reference checkpoint
    has no 'iteration'). RNG states are restored per rank when the world size is unchanged; otherwise, and for a
    reference checkpoint, generators keep their fresh seeds.
    """
    state = load_training_state(path)
    reference = _is_reference(state)
    missing = [k for k in ("model", "optimizer", "epoch", "iteration", "rng") if k not in state]
    if missing and not reference:
        raise CheckpointError(f"{path}: not a training state saved by mae-transfer or the MAE reference's scripts "
                              f"(missing {', '.join(missing)})")
    saved = state.get("args", {})
    saved = {**(unrecorded or {}), **(vars(saved) if isinstance(saved, argparse.Namespace) else saved)}
    changed = [k for k, v in (expected or {}).items() if saved.get(k) is not None and saved[k] != v]
    if changed:
        raise CheckpointError(
            f"{path} was saved by a run with {_settings(saved, changed)}; this run has "
            f"{_settings(expected, changed)}. Resume with the flags (or --preset) the run was started with.")

    def mismatch(what: str, flags: Sequence[str], err: Exception) -> CheckpointError:
        given = " ".join(f"--{k} {saved[k]}" for k in flags if saved.get(k) is not None)
        return CheckpointError(f"{path}: its {what} does not fit this run's (it was saved by a run with "
                               f"{given or 'other flags'}); resume with the flags the run was started with.\n{err}")

    try:  # torch lists every mismatched key or group; say first what went wrong
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise mismatch("model", ("model", "input_size", "nb_classes"), err) from None
    saved_optimizer = (_renumbered(path, state["optimizer"], state["model"], model, optimizer) if reference
                       else state["optimizer"])
    try:
        optimizer.load_state_dict(_with_settings_of(optimizer, saved_optimizer))
    except ValueError as err:  # the parameter groups differ: another fine-tuning mode or layer decay
        raise mismatch("optimizer", ("mode", "partial_blocks", "layer_decay", "weight_decay"), err) from None
    precision.load_state_dict(state.get("scaler") or {})
    if not reference and len(state["rng"]) == get_world_size():
        set_rng_state(state["rng"][get_rank()], precision.device)
    return {**state, "args": saved}


def _is_reference(state: Dict[str, Any]) -> bool:
    """A training checkpoint of the MAE reference's scripts (misc.save_model): its keys, and no generators."""
    return REFERENCE_KEYS <= state.keys() and "rng" not in state


def _with_settings_of(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> Dict[str, Any]:
    """`saved` with `optimizer`'s group settings, applied before loading: torch places each moment and step count
    as its group's kernel needs them (a fused group's steps on the parameters' device). Groups that do not pair up
    are left to torch's error."""
    groups = saved.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        return saved
    return {**saved, "param_groups": [{**theirs, **{k: v for k, v in ours.items() if k != "params"}}
                                      for theirs, ours in zip(groups, optimizer.param_groups)]}


def _renumbered(path: Path, saved: Dict[str, Any], weights: Dict[str, torch.Tensor], model: nn.Module,
                optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """A reference checkpoint's optimizer state, numbered as `optimizer` numbers its parameters.

    torch matches saved state to parameters by position: the i-th parameter of the saved groups, taken in order.
    The reference's scripts number them group by group (one lr_scale, weight decay or none: timm's add_weight_decay,
    lr_decay.param_groups_lrd, LARS over the head), each group in their model's registration order, which is not
    always ours (models_vit.py adds fc_norm after the head), and in groups that need not be ours (one per layer where
    a --layer_decay 1 run of ours has one per kind; at weight decay 0, timm 0.3.2 keeps a no-decay and a decay group
    where today's timm makes one). So each saved parameter takes the next of this run's parameters, in the
    checkpoint's key order, of its group's kind (its lr_scale; weight decay or none) and of its moments' shape:
    right wherever groups of one kind follow one another in that order or differ in shapes, as in each of those
    rules."""
    params = dict(model.named_parameters())
    name_of = {id(param): name for name, param in params.items()}
    ours = [(name_of[id(param)], group) for group in optimizer.param_groups for param in group["params"]]
    index = {name: i for i, (name, _) in enumerate(ours)}
    group_of = dict(ours)
    waiting = [name for name in weights if name in index]  # the checkpoint's order
    state = {}
    for number, group in enumerate(saved["param_groups"]):
        for saved_index in group["params"]:
            moments = saved["state"].get(saved_index, {})
            shape = next((tuple(v.shape) for v in moments.values() if torch.is_tensor(v) and v.ndim), None)
            name = next((candidate for candidate in waiting if _same_kind(group, group_of[candidate])
                         and shape in (None, tuple(params[candidate].shape))), None)
            if name is None:
                raise _unmatched(path, f"whose optimizer group {number} ({_kind(group)}) holds a parameter"
                                       f"{f' of shape {shape}' if shape else ''} where this run has none of that "
                                       "kind left")
            waiting.remove(name)
            if moments:
                state[index[name]] = moments
    if waiting:
        raise _unmatched(path, f"whose optimizer holds no place for {len(waiting)} of this run's parameters "
                               f"({', '.join(waiting[:3])}{', ...' if len(waiting) > 3 else ''})")
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return {"state": state, "param_groups": [{"params": list(range(start, start + size))}
                                             for start, size in zip(starts, sizes)]}


def _same_kind(theirs: Dict[str, Any], ours: Dict[str, Any]) -> bool:
    # LARS (the reference's and ours) decays exactly the parameters with ndim > 1, whatever its group's weight decay:
    # main_linprobe.py's one group over the head holds what ours splits by decay, so decay tells no kinds apart there.
    lars = "trust_coefficient" in theirs and "trust_coefficient" in ours
    return (math.isclose(theirs.get("lr_scale", 1.0), ours.get("lr_scale", 1.0), rel_tol=1e-6)
            and (lars or (theirs["weight_decay"] == 0) == (ours["weight_decay"] == 0)))


def _kind(group: Dict[str, Any]) -> str:
    decay = f"weight decay {group['weight_decay']}" if group["weight_decay"] else "no weight decay"
    return decay + (f", lr_scale {group['lr_scale']:.4g}" if "lr_scale" in group else "")


def _unmatched(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: a training checkpoint of the MAE reference's scripts {why}; resume with the "
                           "flags its run had (its weight decay, layer decay and mode make its optimizer's groups)")


def _settings(values: Dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={values[k]}" for k in keys)


def latest_checkpoint(path: Path) -> Optional[Path]:
    """`path` if it is a file, else the checkpoint-N.pth in the directory `path` with the largest N (or None)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such file or directory")
    found: List[Path] = [p for p in path.iterdir() if CHECKPOINT_PATTERN.fullmatch(p.name)]
    return max(found, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name).group(1)), default=None)


def resume(args: argparse.Namespace, *, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
           recipe: Sequence[str] = (), unrecorded: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """The --resume flag, as the reference's misc.load_model: restore the checkpoint `args.resume` names (a file,
    or a directory's latest checkpoint), set `args.start_epoch` to the epoch after it and say so.

    `recipe` names the flags that must be as the checkpoint's run had them (see load_state, and its `unrecorded`);
    other settings that differ (--epochs, to extend a run) are listed. Checkpoints are taken at the end of an epoch
    and the schedule's position is a fraction of the run's epochs, so a run may resume on another number of GPUs
    (with --effective_batch_size, the recipe's batch is kept).

    Returns the checkpoint restored, or None when `args.resume` is empty or a directory with no checkpoint yet, so a
    job that is always launched with --resume OUTPUT_DIR starts fresh the first time. Without --resume, an
    --output_dir holding an earlier run's checkpoints is refused: the fresh run would overwrite some and leave the
    later ones, which a --resume of that folder would then take.
    """
    if not args.resume:
        earlier = latest_checkpoint(Path(args.output_dir)) if Path(args.output_dir).is_dir() else None
        if earlier is not None:
            raise CheckpointError(f"--output_dir {args.output_dir} holds {earlier.name} of an earlier run: add "
                                  f"--resume {args.output_dir} to continue that run, or give a new --output_dir")
    checkpoint = latest_checkpoint(Path(args.resume)) if args.resume else None
    if checkpoint is None:
        if args.resume and is_main_process():
            print(f"--resume {args.resume}: no checkpoint there yet; starting from scratch")
        return None
    state = load_state(checkpoint, model=model, optimizer=optimizer, precision=precision,
                       expected={k: getattr(args, k) for k in recipe}, unrecorded=unrecorded)
    args.start_epoch = state["epoch"] + 1
    if is_main_process():
        print(f"resumed from {checkpoint}: epoch {state['epoch']} done, " + (
            "a training checkpoint of the MAE reference's scripts (model, optimizer and loss scaler restored; it "
            "records no random generators, so they start afresh from --seed)" if _is_reference(state)
            else f"{state['iteration']} iterations"))
        saved, now = state["args"], vars(args)
        changed = [k for k in sorted(saved.keys() & now.keys() - RUN_MECHANICS) if saved[k] != now[k]]
        if changed:
            print(f"settings changed since that run: {_settings(now, changed)} (were {_settings(saved, changed)})")
        if args.start_epoch >= args.epochs:
            print(f"all {args.epochs} epochs were done: nothing to train")
    return checkpoint
