"""Reading checkpoints without executing pickled code, and writing them atomically.

Weights we write are safetensors (no code can hide in them), with our metadata as JSON in the safetensors header,
so one file is the whole checkpoint and a rename makes it appear complete or not at all. We read those, torch.save
files (through torch's weights-only unpickler) and detectron2's model-zoo .pkl files (plain pickles of numpy
arrays, through array_pickle's unpickler, which builds numeric arrays and nothing else).
"""
import argparse
import errno
import json
import os
import pickle
import re
import secrets
import shutil
import stat
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .array_pickle import ArrayPickleError, read_array_pickle

__all__ = ["CheckpointError", "atomic_directory", "atomic_path", "read_file", "save_weights", "save_training_state",
           "load_training_state", "write_json", "METADATA_KEY"]

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


def write_json(path, record: Any) -> Path:
    """A results file (metrics, AP, mIoU) as indented JSON, written atomically: a reader never sees half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)


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


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
            ours = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
        except ValueError as e:
            raise CheckpointError(f"{path}: its {METADATA_KEY!r} header metadata is not JSON ({e})") from None
        if not isinstance(ours, dict):
            raise CheckpointError(f"{path}: its {METADATA_KEY!r} header metadata is not a JSON object (found "
                                  f"{type(ours).__name__})")
        return tensors, ours
    if path.suffix == ".pkl" and not zipfile.is_zipfile(path):  # (a torch.save file named .pkl goes to torch.load)
        try:
            obj, read = read_array_pickle(path)
        except ArrayPickleError as e:
            raise CheckpointError(f"{path}: refused to load: the pickle asks for {e}; only numeric numpy arrays in "
                                  f"plain containers (detectron2's model-zoo format) are unpickled here") from None
        except Exception as e:  # noqa: BLE001 - whatever the unpickler trips on, the file is not a checkpoint
            raise CheckpointError(f"{path}: not a readable .pkl checkpoint (truncated, or not a pickle of numpy "
                                  f"arrays): {_first_line(e)}") from None
        if read:
            return obj, {}
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is mostly advice to pass weights_only=False; keep the unpickler's own reason: the global
        # it refused (worded differently across torch versions, but always "GLOBAL <name>"), else its error line
        # (and not its advice to allow the global, which would contradict this refusal)
        refused = re.search(r"GLOBAL (\S+)", str(e))
        reason = (f"GLOBAL {refused.group(1)}" if refused else
                  str(e).partition("WeightsUnpickler error:")[2].strip().split("\n")[0].split(" Please use")[0])
        reason = reason.rstrip(". ") or type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint (the weights-only unpickler stopped at: "
            f"{reason}). It is either corrupt or holds pickled objects beyond tensors and plain containers, which "
            f"could run arbitrary code when unpickled, so it is never unpickled here") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler trips on, the file is not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or not a PyTorch/safetensors file): "
                              f"{_first_line(e)}") from None
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
