"""Converting a checkpoint into another tool's layout, losing nothing silently.

`TARGETS` is the one table of what each output format holds and how it is stored on disk; `convert` builds the
converted weights (dropping only what the target has no place for, each drop with its reason, and refusing
conversions that would leave the target incomplete); `write` stores them atomically. tools/convert_checkpoint.py
is the command line over these.

Resizing for another resolution or patch size (`resize`):
- pos_embed is resized bicubically, as the reference does to fine-tune at 448 and as detectron2 and mmseg do at
  forward or load time: it is learned in fine-tuned checkpoints, and every host expects the interpolated table.
- decoder_pos_embed is a fixed sin-cos table (never trained), so it is recomputed for the new grid: exactly what an
  MAE built at that size holds. Interpolating it instead would give a table no MAE model uses, with its
  highest-frequency channels aliased. (A decoder table that is not the sin-cos one is interpolated like pos_embed.)
- the patch embedding is resampled with timm's `resample_patch_embed` (FlexiViT's pseudo-inverse of the resize):
  the P-pixel kernel applied to an image resized by P/p gives what the p-pixel kernel gave on the original. For
  detectron2 it is interpolated bicubically instead, as ViTDet made its ViT-H "p14to16" weights, so a converted
  file is what ViTDet's recipe was fine-tuned from (and what ViTDetCheckpointer makes of the original). The image
  size is kept, so the patch grid (and pos_embed) changes unless --img-size scales with the patch.
"""
import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from .formats import FORMATS, HEAD_KEYS, LINPROBE_BN_EPS, LINPROBE_HEAD, Checkpoint
from .formats import hf
from .io import CheckpointError, atomic_directory, atomic_path
from .load import summarize_keys
from ..models.mae import DECODER_KEYS
from ..models.pos_embed import (fit_pos_embed, interpolate_patch_embed, pos_embed_grid, resample_patch_embed,
                                sincos_pos_embed_2d)

__all__ = ["Target", "TARGETS", "Conversion", "convert", "resize", "fold_linprobe_head", "check_destination", "write"]

StateDict = Dict[str, torch.Tensor]

_DECODER = (("mask_token", "the MAE decoder"), ("decoder_*", "the MAE decoder"))
_HEAD = (("head.*", "the classification head"), ("fc_norm.*", "the classification head's norm"))
_CLS = ("cls_token", "the model has a cls token, which a detectron2 (ViTDet) checkpoint does not keep")
# A segmentation backbone's own parts (mmseg's MAE, our ViTBackbone): trained, they change what the encoder computes.
_SEGMENTATION_PARTS = ("blocks.*.rel_pos_bias.table", "blocks.*.ls1.gamma", "blocks.*.ls2.gamma")


# (weight, new (p, p)) -> weight, and how the change is described (see the module docstring)
PATCH_RESAMPLING: Dict[str, Tuple[Callable[[torch.Tensor, List[int]], torch.Tensor], str]] = {
    "flexivit": (resample_patch_embed, "FlexiViT pseudo-inverse"),
    "vitdet": (interpolate_patch_embed, "bicubic, as ViTDet"),
}


@dataclass(frozen=True)
class Target:
    """An output format: how it is stored and which canonical tensors it holds."""
    format: str                              # the registered Format that maps canonical names to this layout
    suffixes: Tuple[str, ...]                # accepted output names; '' = a directory
    wrap: Optional[str] = None               # torch.save container key ({'model': sd}); None: the bare dict
    drops: Tuple[Tuple[str, str], ...] = ()  # (glob of canonical keys, why the target has no place for them)
    needs: Tuple[Tuple[str, str], ...] = ()  # (glob, why): without a match the target would be incomplete
    # Directory targets: builds the config file written beside the weights from the converted checkpoint, and
    # says which of its fields the checkpoint did not record (so were given standard values).
    config: Optional[Callable[[Checkpoint], Tuple[Dict[str, Any], Dict[str, Any]]]] = None
    patch_resample: str = "flexivit"  # how --patch-size changes the patch embedding: a key of PATCH_RESAMPLING
    linear_head: bool = False  # the host's head is one Linear: a linear probe's BatchNorm is folded into it
    segmentation_parts: bool = False  # the layout holds relative position bias tables and layer scale

    @property
    def is_directory(self) -> bool:
        return self.suffixes == ("",)


def _because(parts, where: str) -> Tuple[Tuple[str, str], ...]:
    return tuple((pattern, f"{what}: {where}") for pattern, what in parts)


# Safetensors wherever the target's own loader reads it (timm, transformers); elsewhere a torch.save'd dict of
# plain tensors, in the container the host's checkpointer expects (the reference and detectron2: {'model': ...}).
TARGETS: Dict[str, Target] = {
    "mae": Target("mae", (".pth",), wrap="model", needs=(_CLS,)),
    "timm": Target("timm", (".safetensors", ".pth"), needs=(_CLS,),
                   drops=_because(_DECODER, "timm's VisionTransformer is the encoder alone"), linear_head=True),
    "hf": Target("hf", ("",),
                 drops=_because(_HEAD, "transformers' ViTMAE has no classifier"),
                 needs=(_CLS, ("mask_token", "ViTMAEForPreTraining needs the MAE decoder (mask_token, decoder_*); "
                                       "without it transformers would initialise one at random. Use a full "
                                       "checkpoint, or add --encoder-only to write a ViTMAEModel"),
                        ("norm.*", "ViTMAE ends with a LayerNorm (vit.layernorm), which a fine-tuned, "
                                   "global-pool checkpoint replaces by fc_norm")),
                 config=hf.hf_config),
    "detectron2": Target("detectron2", (".pth",), wrap="model",
                         drops=_because(_DECODER + _HEAD, "a detector backbone keeps the encoder only") + (
                             ("cls_token", "detectron2's ViT has no cls token (it keeps the cls row of pos_embed "
                                           "and drops it at forward)"),
                             ("norm.*", "the encoder's final norm: ViTDet's pyramid reads the last block "
                                        "directly")),
                         patch_resample="vitdet"),
    "mmseg": Target("mmseg", (".pth",), needs=(_CLS,),  # bare keys, as mmseg's own model_converters write them
                    drops=_because(_DECODER + _HEAD, "a segmentation backbone keeps the encoder only"),
                    segmentation_parts=True),
}


@dataclass
class Conversion:
    """The outcome of `convert`: what will be written and what was left out."""
    source: Checkpoint
    target: Target
    checkpoint: Checkpoint     # the converted weights in canonical names; .arch() describes the written model
    state_dict: StateDict      # the same tensors under the target's names
    dropped: Dict[str, str]    # canonical key -> why it is not written
    changes: List[str] = field(default_factory=list)  # tensors resized, resampled or folded
    config: Optional[Dict[str, Any]] = None            # a directory target's config file
    assumed: Dict[str, Any] = field(default_factory=dict)  # config fields the source did not record: defaults


def _matching(keys, pattern: str) -> List[str]:
    return [k for k in keys if fnmatchcase(k, pattern)]


def resize(sd: StateDict, img_size: Optional[int] = None, patch_size: Optional[int] = None,
           patch_resample: str = "flexivit") -> Tuple[StateDict, List[str]]:
    """Canonical weights for another input size and/or patch size (see the module docstring); returns the new
    state dict and one line per tensor changed."""
    weight, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    patch = weight.shape[-1]
    try:
        grid, prefix = pos_embed_grid(pos)
    except ValueError as err:
        raise CheckpointError(f"--img-size / --patch-size: {err}") from None
    new_patch = patch_size or patch
    new_img = img_size or grid * patch
    if new_img % new_patch:
        raise CheckpointError(f"--img-size {new_img} is not a multiple of the patch size {new_patch}")
    new_grid = new_img // new_patch
    out, changes = dict(sd), []
    if new_patch != patch:
        if any(k.startswith(DECODER_KEYS) for k in sd):
            raise CheckpointError(f"--patch-size resamples the encoder's patch embedding, but the decoder predicts "
                                  f"the pixels of {patch}x{patch} patches; add --encoder-only")
        resample, how = PATCH_RESAMPLING[patch_resample]
        out["patch_embed.proj.weight"] = resample(weight, [new_patch, new_patch])
        changes.append(f"patch_embed.proj.weight {tuple(weight.shape)} -> "
                       f"{tuple(out['patch_embed.proj.weight'].shape)}: resampled ({how})")
    if new_grid != grid:
        out["pos_embed"] = fit_pos_embed(pos, (new_grid, new_grid), num_prefix_tokens=prefix)
        changes.append(f"pos_embed {tuple(pos.shape)} -> {tuple(out['pos_embed'].shape)}: bicubic, "
                       f"{grid}x{grid} -> {new_grid}x{new_grid} patches")
        if "decoder_pos_embed" in sd:
            table = sd["decoder_pos_embed"]
            fixed = sincos_pos_embed_2d(table.shape[-1], (grid, grid))
            # within the rounding of the table's dtype: an fp16/bf16 checkpoint holds the same table, rounded
            if torch.allclose(table.float(), fixed, atol=max(1e-5, torch.finfo(table.dtype).eps)):
                out["decoder_pos_embed"] = sincos_pos_embed_2d(table.shape[-1], (new_grid, new_grid)).to(table.dtype)
                how = "recomputed (fixed sin-cos)"
            else:
                out["decoder_pos_embed"] = fit_pos_embed(table, (new_grid, new_grid))
                how = "bicubic (not the fixed sin-cos table)"
            changes.append(f"decoder_pos_embed {tuple(table.shape)} -> {tuple(out['decoder_pos_embed'].shape)}: "
                           f"{how}")
    return out, changes


def fold_linprobe_head(sd: StateDict, path) -> Tuple[StateDict, str]:
    """A linear probe's head, BatchNorm1d(affine=False) (head.0) then Linear (head.1), as one Linear (head).

    Folding rather than refusing: a BatchNorm without affine parameters computes (x - running_mean) /
    sqrt(running_var + eps) at inference, an affine map, so W (x - m) / s + b = (W / s) x + (b - W m / s) gives the
    same logits in eval mode, which is all a converted classifier is used for; timm's head has no place for the
    BatchNorm, so refusing would leave a linear probe no way into timm. (Only training mode, with batch statistics,
    would differ.)"""
    found = {k for k in sd if k.startswith(("head.0.", "head.1."))} - {"head.0.num_batches_tracked"}
    expected = {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"}
    if found != expected:  # e.g. an affine BatchNorm: not the linear probe's head
        raise CheckpointError(f"{path}: a head timm's one Linear can hold is a linear probe's BatchNorm1d("
                              f"affine=False) + Linear ({', '.join(sorted(expected))}); this one has "
                              f"{', '.join(sorted(found))}")
    weight, bias = sd["head.1.weight"], sd["head.1.bias"]
    scale = (sd["head.0.running_var"].double() + LINPROBE_BN_EPS).rsqrt()
    folded = weight.double() * scale
    out = {k: v for k, v in sd.items() if not k.startswith(("head.0.", "head.1."))}
    out["head.weight"] = folded.to(weight.dtype)
    out["head.bias"] = (bias.double() - folded @ sd["head.0.running_mean"].double()).to(bias.dtype)
    return out, (f"head.0.* (BatchNorm1d without affine, eps {LINPROBE_BN_EPS:g}) folded into head.1.* -> "
                 "head.weight, head.bias: timm's head is one Linear; the same logits in eval mode")


def convert(source: Checkpoint, to: str, *, img_size: Optional[int] = None, patch_size: Optional[int] = None,
            encoder_only: bool = False) -> Conversion:
    """`source` in the layout of TARGETS[to]. Raises CheckpointError, before anything is written, when the target
    would lack something it needs or the mapping would lose a tensor the target was not declared to drop."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown output format {to!r}; choose from {', '.join(TARGETS)}")
    target = TARGETS[to]
    if target.format not in FORMATS:
        raise CheckpointError(f"the {target.format!r} format is not available (known: {', '.join(FORMATS)})")
    fmt = FORMATS[target.format]
    source.arch()  # a clear error now if the source holds no ViT encoder
    sd = dict(source.state_dict)

    dropped: Dict[str, str] = {}
    if encoder_only:
        dropped.update({k: "--encoder-only" for k in sd if k.startswith(DECODER_KEYS + HEAD_KEYS)})
    for pattern, why in target.drops:
        for key in _matching(sd, pattern):
            dropped.setdefault(key, why)
    sd = {k: v for k, v in sd.items() if k not in dropped}

    if not target.segmentation_parts:
        parts = [k for pattern in _SEGMENTATION_PARTS for k in _matching(sd, pattern)]
        if parts:  # dropped, the written encoder would compute something else; kept, the host would refuse them
            raise CheckpointError(f"{source.path} ({source.format}) holds a segmentation backbone's own parts ("
                                  + ", ".join(summarize_keys(parts)) + f"), which the {to} layout has no place "
                                  "for and without which the encoder computes something else: write it --to mmseg")

    lacking = [why for pattern, why in target.needs
               if not _matching(sd, pattern) and not (encoder_only and pattern.startswith(DECODER_KEYS))]
    if lacking:
        raise CheckpointError(f"{source.path} ({source.kind} checkpoint) cannot be written as {to}: "
                              + "; ".join(lacking))

    changes: List[str] = []
    if img_size is not None or patch_size is not None:
        sd, changes = resize(sd, img_size, patch_size, target.patch_resample)
    if target.linear_head and LINPROBE_HEAD in sd:
        sd, folded = fold_linprobe_head(sd, source.path)
        changes.append(folded)

    mapped = fmt.from_canonical(sd)
    back = fmt.to_canonical(mapped)
    lost = [k for k in sd if k not in back]
    if lost:
        raise CheckpointError(f"the {to} layout has no place for " + ", ".join(summarize_keys(lost))
                              + "; writing it would change the model")
    altered = [k for k in sd if not torch.equal(back[k], sd[k])]
    if altered:  # every format's mapping must be exactly invertible: this is a bug in formats/<name>.py
        raise CheckpointError(f"the {to} mapping does not give back " + ", ".join(summarize_keys(altered)))

    converted = Checkpoint(source.path, to, sd, dict(source.meta))
    conversion = Conversion(source, target, converted, mapped, dropped, changes)
    if target.config is not None:
        conversion.config, conversion.assumed = target.config(converted)
    return conversion


def check_destination(to: str, dst) -> Path:
    """DST must be new (nothing is ever overwritten) and named like what TARGETS[to] writes."""
    dst = Path(dst)
    target = TARGETS[to]
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; not overwriting it (remove it or choose another name)")
    if target.is_directory:
        if dst.suffix in (".pth", ".pt", ".bin", ".pkl", ".safetensors"):
            raise CheckpointError(f"--to {to} writes a directory (config.json + {hf.WEIGHTS_NAME}), but {dst} is "
                                  f"named like a file; drop the {dst.suffix} suffix")
    elif dst.suffix not in target.suffixes:
        raise CheckpointError(f"--to {to} writes a {' or '.join(target.suffixes)} file; {dst} does not end so")
    return dst


def _plain(state_dict: StateDict) -> StateDict:
    """CPU tensors that own their memory (a view would drag its whole base storage into the file)."""
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    return out


def write(conversion: Conversion, dst) -> Path:
    """Store a conversion at `dst` atomically: it appears complete or not at all."""
    target = conversion.target
    dst = check_destination(target.format, dst)
    if target.is_directory:
        with atomic_directory(dst) as tmp:
            (tmp / hf.CONFIG_NAME).write_text(json.dumps(conversion.config, indent=2, sort_keys=True) + "\n")
            save_file(_plain(conversion.state_dict), str(tmp / hf.WEIGHTS_NAME), metadata={"format": "pt"})
    elif dst.suffix == ".safetensors":
        with atomic_path(dst, overwrite=False) as tmp:
            save_file(_plain(conversion.state_dict), str(tmp), metadata={"format": "pt"})
    else:
        tensors = _plain(conversion.state_dict)
        with atomic_path(dst, overwrite=False) as tmp:
            torch.save({target.wrap: tensors} if target.wrap else tensors, tmp)
    return dst
