"""Classifiers on the MAE encoder for the three transfer protocols of the paper.

    finetune   every parameter trains; a new linear head (trunc_normal std 2e-5, bias 0) on the average of the patch
               tokens after fc_norm (the final norm is removed), or on the normalised cls token
    linprobe   the encoder is frozen; the head is BatchNorm1d(affine=False, eps 1e-6) + Linear (trunc_normal std
               0.01, bias 0), which is the reference's linear probe: the parameter-free BN only whitens features
    partial    the last K blocks, the final norm (norm or fc_norm) and a fine-tuning head train; K = 0 is linear
               probing, so it builds the linear-probing model

All three are the repository's one ViT (timm's VisionTransformer) with a timm pooling head: 'avg' pooling gives the
fc_norm model of the MAE fine-tuning code, 'token' the cls-token model.
"""
from typing import List

from torch import nn
from timm.layers import trunc_normal_

from ..checkpoints.formats import LINPROBE_BN_EPS
from ..models import MODELS, VisionTransformer, create_model

__all__ = ["MODES", "ENCODERS", "build_classifier", "resolve_mode", "set_trainable", "trainable_names"]

MODES = ("finetune", "linprobe", "partial")
ENCODERS = tuple(name for name in MODELS if name.startswith("vit_"))
FINETUNE_HEAD_STD = 2e-5
LINPROBE_HEAD_STD = 0.01


def resolve_mode(mode: str, partial_blocks: int) -> str:
    """The protocol actually run: partial fine-tuning of 0 blocks is linear probing."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if partial_blocks < 0:
        raise ValueError(f"--partial_blocks must be >= 0, got {partial_blocks}")
    return "linprobe" if mode == "partial" and partial_blocks == 0 else mode


def build_classifier(model: str, num_classes: int, *, mode: str = "finetune", global_pool: bool = True,
                     drop_path: float = 0.0, img_size: int = 224, partial_blocks: int = 0,
                     **model_kwargs) -> VisionTransformer:
    """A ViT classifier for `mode`, with the head initialised and the right parameters trainable.

    `model_kwargs` go to the builder (any timm VisionTransformer argument, e.g. depth or embed_dim)."""
    if model not in ENCODERS:
        raise ValueError(f"--model {model!r} is not a ViT encoder; choose one of {', '.join(ENCODERS)} "
                         "(a pretraining checkpoint of mae_vit_X loads into vit_X)")
    if num_classes < 1:
        raise ValueError(f"a classifier needs at least one class, got nb_classes={num_classes}")
    mode = resolve_mode(mode, partial_blocks)
    net = create_model(model, num_classes=num_classes, global_pool="avg" if global_pool else "token",
                       drop_path_rate=drop_path, img_size=img_size, **model_kwargs)
    linear = net.head
    trunc_normal_(linear.weight, std=LINPROBE_HEAD_STD if mode == "linprobe" else FINETUNE_HEAD_STD)
    nn.init.zeros_(linear.bias)
    if mode == "linprobe":
        net.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=LINPROBE_BN_EPS), linear)
    set_trainable(net, mode, partial_blocks)
    return net


def set_trainable(net: VisionTransformer, mode: str, partial_blocks: int = 0) -> None:
    """Freeze what `mode` keeps fixed (requires_grad False); frozen parameters get no gradient and no update."""
    mode = resolve_mode(mode, partial_blocks)
    depth = len(net.blocks)
    if mode == "partial" and partial_blocks > depth:
        raise ValueError(f"--partial_blocks {partial_blocks} exceeds the model's {depth} blocks")
    trainable_prefixes = {
        "finetune": ("",),
        "linprobe": ("head.",),
        "partial": ("head.", "norm.", "fc_norm.") + tuple(f"blocks.{i}." for i in range(depth - partial_blocks, depth)),
    }[mode]
    for name, param in net.named_parameters():
        param.requires_grad_(name.startswith(trainable_prefixes))


def trainable_names(net: nn.Module) -> List[str]:
    return [name for name, param in net.named_parameters() if param.requires_grad]
