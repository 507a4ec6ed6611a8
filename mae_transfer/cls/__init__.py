"""Classification transfer: fine-tuning, linear probing and partial fine-tuning of the MAE encoder."""
from .evaluate import evaluate
from .lars import LARS
from .load import NEW_KEYS, load_pretrained
from .model import ENCODERS, MODES, build_classifier, resolve_mode, set_trainable, trainable_names
from .optim import OPTIMIZERS, build_optimizer
from .presets import MODE_DEFAULTS, PRESETS

__all__ = ["ENCODERS", "LARS", "MODES", "MODE_DEFAULTS", "NEW_KEYS", "OPTIMIZERS", "PRESETS", "build_classifier",
           "build_optimizer", "evaluate", "load_pretrained", "resolve_mode", "set_trainable",
           "trainable_names"]
