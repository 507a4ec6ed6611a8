"""Training machinery shared by pretraining and fine-tuning: optimizer groups, the warmup-cosine schedule, mixed
precision, torch.distributed set-up, logging, resumable state and the epoch loop."""
from .amp import AMP_HELP, AMP_MODES, Precision
from .batch import resolve_accum_iter
from .distributed import (DistInfo, all_gather_object, all_reduce, barrier, cleanup, get_rank, get_world_size,
                          init_distributed, is_distributed, is_main_process, seed_everything)
from .logging import RunLog, progress_bar
from .loop import EpochResult, NonFiniteLossError, StepFn, exit_on_non_finite, skip_gradient_sync, train_one_epoch
from .optim import adamw, param_groups, scaled_lr
from .schedule import warmup_cosine
from .state import latest_checkpoint, load_state, resume, rng_state, save_state, set_rng_state

__all__ = ["AMP_HELP", "AMP_MODES", "DistInfo", "EpochResult", "NonFiniteLossError", "Precision", "RunLog", "StepFn",
           "adamw", "all_gather_object", "all_reduce", "barrier", "cleanup", "exit_on_non_finite", "get_rank",
           "get_world_size", "init_distributed", "is_distributed", "is_main_process", "latest_checkpoint", "load_state",
           "param_groups", "progress_bar", "resolve_accum_iter", "resume", "rng_state", "save_state", "scaled_lr",
           "seed_everything", "set_rng_state", "skip_gradient_sync", "train_one_epoch", "warmup_cosine"]
