"""Reading checkpoints without executing pickled code, and writing them atomically.

Weights we write are safetensors (no code can hide in them), with our metadata as JSON in the safetensors header,
so one file is the whole checkpoint and a rename makes it appear complete or not at all. We read those, torch.save
files (through torch's weights-only unpickler) and detectron2's model-zoo .pkl files (plain pickles of numpy
arrays, through an unpickler that can rebuild arrays and nothing else).
"""
import argparse
import codecs
import collections
import errno
import importlib
import json
import os
import pickle
import secrets
import shutil
import stat
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "atomic_directory", "atomic_path", "read_file", "save_weights", "save_training_state",
           "load_training_state", "METADATA_KEY"]

METADATA_KEY = "mae_transfer"
# Classes the MAE reference pickles into its checkpoints besides tensors ('args' is an argparse.Namespace).
# Rebuilding a Namespace only sets attributes, so allowing it keeps torch.load's weights-only guarantee.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or a checkpoint that does not fit a model."""


def _temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def _sync_directory(path: Path) -> None:
    """Make a rename inside `path` durable: until the directory itself is synced, a power loss may lose the name.
    Best effort: some filesystems (network mounts) refuse to sync a directory, and the file is in place by then."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _exists_error(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} appeared while it was being written; not overwriting it (nothing was written)")


@contextmanager
def atomic_path(path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, on failure it vanishes.
    With overwrite=False a `path` that exists by then is left as it is (a CheckpointError).

    The file gets the mode open() gives a new file (0o666 less the umask), whatever the writer did: safetensors >= 0.8
    writes through a 0o600 temporary renamed into place (safetensors#782), which would leave the weights readable by
    their writer alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    # Not tempfile.mkstemp: its 0o600 would survive the rename. Created as open() creates files (0o666 less the
    # umask); O_EXCL claims the name.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        os.chmod(tmp, mode)  # the writer may have replaced the file with one of its own (see above)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # unlike a rename, a link never replaces what is there
            except FileExistsError:
                raise _exists_error(path) from None
            except OSError as err:  # no hard links here (exFAT, some network mounts): check, then rename
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if path.exists():
                    raise _exists_error(path) from None
                os.replace(tmp, path)
        _sync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path) -> Iterator[Path]:
    """Yield a new empty directory beside `path`; on success its files are synced and it is renamed to `path`, on
    failure it vanishes. `path` is checked again just before the rename, which would replace an empty directory
    that appeared meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    tmp.mkdir()  # not tempfile.mkdtemp, whose 0o700 would survive the rename: 0o777 less the umask, as mkdir gives
    file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # 0o666 less the same umask, as open() gives a new file
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, file_mode)  # whatever the writer gave it, as in atomic_path
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            raise _exists_error(path)
        os.rename(tmp, path)
        _sync_directory(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _numpy_core(module: str):
    try:  # NumPy 2 (numpy.core became numpy._core; its pickles name the new modules)
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


# What a pickle of numpy arrays in dicts asks for, under NumPy 1's and NumPy 2's module names (protocol 5 rebuilds
# arrays with _frombuffer, earlier ones with _reconstruct), and how protocol 2 spells bytes in Python 3
# (_codecs.encode(text, 'latin1'), which torch's weights-only unpickler allows too). Each only builds arrays,
# dtypes, scalars or bytes from the values given: none looks up or calls anything the file names.
ARRAY_PICKLE_GLOBALS = {
    **{(f"numpy.{core}.{module}", name): getattr(_numpy_core(module), name) for core in ("core", "_core")
       for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    ("collections", "OrderedDict"): collections.OrderedDict}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain containers and refuses every other global, as Python's documentation shows
    ("Restricting Globals"). Needed for detectron2's model-zoo .pkl files: torch.load reads only torch's formats."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ARRAY_PICKLE_GLOBALS[module, name]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _as_tensors(obj: Any) -> Any:
    """numpy arrays to tensors (and numpy scalars to Python numbers) throughout dicts, lists and tuples."""
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.require(obj, requirements="W"))  # arrays unpickled from bytes may be read-only
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, _as_tensors(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_tensors(v) for v in obj)
    return obj


def _read_array_pickle(path: Path) -> Any:
    """A detectron2 model-zoo file ({'model': {name: ndarray}, '__author__': ...}; detectron2 also tells them by
    their .pkl suffix), with its arrays as tensors. latin1: Detectron1-era files are Python 2 pickles."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as e:
        raise CheckpointError(
            f"{path}: refused to load: it is a pickle that asks for {e}, and only numpy arrays in plain containers "
            f"(detectron2's model-zoo format) are unpickled here: anything else could run arbitrary code") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler trips on, the file is not a checkpoint
        raise CheckpointError(f"{path}: not a readable .pkl checkpoint (truncated, or not a pickle of numpy arrays): "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return _as_tensors(obj)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_file(path) -> Tuple[Any, Dict[str, Any]]:
    """Read a weights file safely: safetensors, a torch.save file loaded with weights_only=True, or a .pkl of numpy
    arrays (detectron2's model zoo) whose arrays become tensors.

    Returns (object, metadata) where metadata is our safetensors header metadata (empty for other files).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        try:
            return tensors, json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
        except ValueError as e:
            raise CheckpointError(f"{path}: its {METADATA_KEY!r} header metadata is not JSON ({e})") from None
    if path.suffix == ".pkl" and not zipfile.is_zipfile(path):  # (a torch.save file named .pkl goes to torch.load)
        return _read_array_pickle(path), {}
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice to pass weights_only=False; keep the unpickler's own reason.
        # (and not its advice to allow the global, which would contradict this refusal)
        reason = str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(" Please use")[0]
        reason = reason.rstrip(". ") or type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint (the weights-only unpickler stopped at: "
            f"{reason}). It is either corrupt or holds pickled objects beyond tensors and plain containers, which "
            f"could run arbitrary code when unpickled, so it is never unpickled here") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler trips on, the file is not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a PyTorch/safetensors file): "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return obj, {}


def save_weights(path, state_dict: Mapping[str, torch.Tensor], metadata: Dict[str, Any] = None) -> Path:
    """Write tensors as safetensors with `metadata` as JSON in the header, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    header = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def save_training_state(path, state: Dict[str, Any]) -> Path:
    """Write resumable training state (plain tensors and containers only), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_training_state(path) -> Dict[str, Any]:
    obj, _ = read_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a training-state dict, got {type(obj).__name__}")
    return obj
