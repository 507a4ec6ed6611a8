"""Training machinery shared by pretraining and fine-tuning: optimizer groups, the warmup-cosine schedule, mixed
precision, torch.distributed set-up, the effective batch and its loader, logging, resumable state, the epoch loop and
the flags that drive them."""
from .amp import AMP_MODES, Precision
from .batch import BatchPlan, BatchPlanError, resolve_accum_iter, training_loader
from .distributed import (DistInfo, all_gather_object, all_reduce, data_parallel, distributed_run, get_rank,
                          get_world_size, init_distributed, is_distributed, is_main_process, seed_everything)
from .flags import (INPUT_ERRORS, add_batch_flags, add_precision_flags, add_run_flags, exit_on_input_error,
                    positive_int, preset_defaults)
from .logging import RunLog, open_run_log, progress_bar
from .loop import EpochResult, NonFiniteLossError, StepFn, exit_on_non_finite, skip_gradient_sync, train_one_epoch
from .optim import adamw, param_groups, scaled_lr
from .schedule import warmup_cosine
from .state import latest_checkpoint, load_state, resume, rng_state, save_epoch, save_state, set_rng_state

__all__ = ["AMP_MODES", "BatchPlan", "BatchPlanError", "DistInfo", "EpochResult", "INPUT_ERRORS", "NonFiniteLossError",
           "Precision", "RunLog", "StepFn", "adamw", "add_batch_flags", "add_precision_flags", "add_run_flags",
           "all_gather_object", "all_reduce", "data_parallel", "distributed_run", "exit_on_input_error",
           "exit_on_non_finite", "get_rank", "get_world_size", "init_distributed", "is_distributed", "is_main_process",
           "latest_checkpoint", "load_state", "open_run_log", "param_groups", "positive_int", "preset_defaults",
           "progress_bar", "resolve_accum_iter", "resume", "rng_state", "save_epoch", "save_state", "scaled_lr",
           "seed_everything", "set_rng_state", "skip_gradient_sync", "train_one_epoch", "training_loader",
           "warmup_cosine"]
