"""The command-line flags every training script shares (pretrain/main_pretrain.py, tools/train_cls.py), declared once
with the MAE reference's names and meanings (its main_pretrain.py, main_finetune.py and main_linprobe.py each
repeat them)."""
import argparse
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Mapping

from ..checkpoints import CheckpointError
from ..data.classification import DatasetFormatError
from .amp import AMP_MODES
from .batch import BatchPlanError

__all__ = ["INPUT_ERRORS", "add_batch_flags", "add_precision_flags", "add_run_flags", "exit_on_input_error",
           "positive_int", "preset_defaults"]

# What a command given a wrong path, an unreadable or unsafe checkpoint, a malformed dataset or batch flags that do
# not add up raises. Every such message names the file (or flag), so the user needs that line alone, as with
# argparse's own errors.
INPUT_ERRORS = (CheckpointError, DatasetFormatError, FileNotFoundError, NotADirectoryError, BatchPlanError)


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Around a script's main: an input error ends the command with its message and exit status 1, no traceback."""
    try:
        yield
    except INPUT_ERRORS as err:
        raise SystemExit(f"error: {err}") from None


def positive_int(text: str) -> int:
    """argparse type of counts that cannot be zero (a zero --save_every would fail only after a whole epoch)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _folder(text: str) -> str:
    if not text.strip():  # the reference's "empty for no saving": here a run always saves, so name a folder
        raise argparse.ArgumentTypeError("empty: name the folder to write into")
    return text


def preset_defaults(preset: Mapping[str, Any], given: argparse.Namespace) -> Dict[str, Any]:
    """A preset's values, to set as defaults so that explicit flags win. An explicit --accum_iter also replaces the
    preset's --effective_batch_size, from which accum_iter would otherwise follow (the two would contradict)."""
    defaults = dict(preset)
    if given.accum_iter is not None and given.effective_batch_size is None:
        defaults.pop("effective_batch_size", None)
    return defaults


def add_batch_flags(parser: argparse.ArgumentParser) -> None:
    """How --batch_size (declared by each script: its default differs) adds up to the effective batch."""
    parser.add_argument("--accum_iter", default=None, type=positive_int,
                        help="gradient accumulation iterations (default 1, or as --effective_batch_size needs)")
    parser.add_argument("--effective_batch_size", default=None, type=positive_int,
                        help="choose accum_iter to reach this batch size over all GPUs (the presets do)")
    parser.add_argument("--max_steps", default=None, type=positive_int,
                        help="stop after this many optimizer steps in all (smoke runs); the schedule is unchanged")


def add_precision_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amp", default="auto", choices=["auto", *AMP_MODES],
                        help="autocast dtype: auto = bf16 on GPUs that compute in it (fp16 on older ones), none "
                             "(fp32) elsewhere; fp16 adds a grad scaler")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training")


def add_run_flags(parser: argparse.ArgumentParser, *, outputs: str, resume: str) -> None:
    """Where a run writes (`outputs`: what lands in --output_dir), what it resumes from, and its loader."""
    parser.add_argument("--output_dir", default="./output_dir", type=_folder, help=outputs)
    parser.add_argument("--log_dir", default=None, help="TensorBoard logs (default: --output_dir)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help=resume)
    parser.add_argument("--start_epoch", default=0, type=int, help="first epoch (resuming sets it)")
    parser.add_argument("--save_every", default=20, type=positive_int,
                        help="save a checkpoint every N epochs (and the last)")
    parser.add_argument("--log_every", default=20, type=positive_int, help="log every N iterations")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", default=True, help="pin loader memory (CUDA only)")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    # So the reference's `python -m torch.distributed.launch ... main_*.py` commands paste: the launcher passes
    # --local-rank, and the reference reads its process group from the launcher's environment too, not from these.
    launcher = parser.add_argument_group("the reference's launcher flags (accepted; the environment torchrun or "
                                         "torch.distributed.launch sets decides, as in the reference)")
    launcher.add_argument("--local_rank", "--local-rank", default=-1, type=int, help="set by the launcher; LOCAL_RANK "
                          "from the environment is used")
    launcher.add_argument("--world_size", default=1, type=int, help="WORLD_SIZE from the environment is used")
    launcher.add_argument("--dist_url", default="env://", choices=["env://"],
                          help="only env:// (torchrun's rendezvous; --rdzv_endpoint for multi-node)")
