"""Checkpoint formats. In memory every checkpoint is a *canonical* state dict: the MAE reference's key names (which
are also timm's). Each on-disk format is a pair of pure functions to/from canonical, registered here; nothing else
in the toolkit renames keys.
"""
import argparse
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..io import CheckpointError, read_file
from ...models.mae import DECODER_KEYS, DECODERS
from ...models.pos_embed import fit_pos_embed, pos_embed_grid
from ...models.vit import ARCHS, arch_from_width

__all__ = ["Format", "FORMATS", "register", "Checkpoint", "parse_checkpoint", "read_checkpoint", "detect_format",
           "HEAD_KEYS", "LINPROBE_HEAD", "LINPROBE_BN_EPS"]

StateDict = Dict[str, torch.Tensor]
HEAD_KEYS = ("head.", "fc_norm.")
LINPROBE_HEAD = "head.1.weight"  # the Linear after a linear probe's BatchNorm1d(affine=False) (head.0)
LINPROBE_BN_EPS = 1e-6  # that BatchNorm's eps (the reference's main_linprobe); files do not record it


def _identity(sd: StateDict) -> StateDict:
    return dict(sd)


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    matches: Callable[[Mapping[str, Any]], bool]  # on the unwrapped state dict's keys
    to_canonical: Callable[[StateDict], StateDict] = _identity
    from_canonical: Callable[[StateDict], StateDict] = _identity
    # Formats stored as a directory (a HuggingFace save_pretrained folder): its (tensors, meta), or None when the
    # directory is not in this format.
    read_directory: Optional[Callable[[Path], Optional[Tuple[StateDict, Dict[str, Any]]]]] = None


FORMATS: Dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its format, canonical weights, our metadata, and any other top-level entries."""
    path: Path
    format: str
    state_dict: StateDict
    meta: Dict[str, Any] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)  # e.g. optimizer, epoch, args of a training checkpoint
    # Parameters the file holds beyond these weights: a detector's or segmentor's own parts (pyramid, heads, ViTDet's
    # relative positions), and buffers derived from the grid.
    set_aside: int = 0

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith(DECODER_KEYS) for k in self.state_dict)

    @property
    def head_key(self) -> Optional[str]:
        """The classifier's Linear weight: head.weight, or head.1.weight behind a linear probe's BatchNorm (head.0,
        as ours and the reference's main_linprobe write it); None without a head."""
        return next((k for k in ("head.weight", LINPROBE_HEAD) if k in self.state_dict), None)

    @property
    def has_head(self) -> bool:
        return self.head_key is not None

    @property
    def kind(self) -> str:
        """'full' (encoder + decoder), 'finetuned' (encoder + classifier head), 'linprobe' (encoder + BatchNorm and
        classifier head) or 'encoder'."""
        if self.has_decoder:
            return "full"
        if self.head_key is None:
            return "encoder"
        return "linprobe" if self.head_key == LINPROBE_HEAD else "finetuned"

    @property
    def decoder_num_heads(self) -> Optional[int]:
        """Decoder heads: from our metadata, else those of our decoder of that width (512 wide: the reference's 16);
        None without a decoder or for an unknown width."""
        if not self.has_decoder:
            return None
        if "decoder_num_heads" in self.meta:
            return int(self.meta["decoder_num_heads"])
        width = self.tensor("decoder_embed.weight").shape[0]
        return next((d["decoder_num_heads"] for d in DECODERS.values() if d["decoder_embed_dim"] == width), None)

    def tensor(self, key: str) -> torch.Tensor:
        """state_dict[key]; a CheckpointError naming the file and the key when a partial checkpoint lacks it."""
        if key not in self.state_dict:
            raise CheckpointError(f"{self.path}: incomplete {self.kind} checkpoint: no {key}")
        return self.state_dict[key]

    def pos_embed_for(self, grid: Sequence[int], num_prefix_tokens: int) -> torch.Tensor:
        """The encoder's position embedding for a model with an (h, w) patch grid and that many prefix tokens:
        resized bicubically from the pretrained square grid where they differ (models.fit_pos_embed)."""
        try:
            return fit_pos_embed(self.tensor("pos_embed"), grid, num_prefix_tokens)
        except ValueError as err:
            raise CheckpointError(f"{self.path}: {err}") from None

    def _depth(self, stack: str, limit: int = 8) -> int:
        """Number of blocks in 'blocks' or 'decoder_blocks'. A CheckpointError unless blocks 0..depth-1 all hold the
        same tensors: a host would initialise what one lacks at random."""
        names: Dict[int, set] = defaultdict(set)
        for key in self.state_dict:
            if key.startswith(stack + "."):
                index, _, name = key[len(stack) + 1:].partition(".")
                names[int(index)].add(name)
        if not names:
            raise CheckpointError(f"{self.path}: incomplete {self.kind} checkpoint: no {stack}.* tensors")
        depth, every = 1 + max(names), set().union(*names.values())
        lacking = []
        for i in range(depth):
            missing = every - names[i]
            lacking += [f"{stack}.{i}.*"] if missing == every else [f"{stack}.{i}.{n}" for n in sorted(missing)]
        if lacking:
            incomplete = sorted({int(key.split(".")[1]) for key in lacking})
            shown = ", ".join(lacking[:limit]) + (f", ... ({len(lacking)} in all)" if len(lacking) > limit else "")
            raise CheckpointError(f"{self.path}: incomplete {self.kind} checkpoint: {stack}.0..{depth - 1} must all "
                                  f"hold the same tensors; block(s) {', '.join(map(str, incomplete))} lack {shown}")
        return depth

    def encoder_state_dict(self) -> StateDict:
        return {k: v for k, v in self.state_dict.items() if not k.startswith(DECODER_KEYS + HEAD_KEYS)}

    def arch(self) -> Dict[str, Any]:
        """Architecture read off the tensor shapes (heads from our metadata or the named size of that width).
        img_size is None where the position table is no square grid (a segmentation backbone's, for non-square
        crops): a flattened table does not say its height and width."""
        sd = self.state_dict
        if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
            raise CheckpointError(f"{self.path}: no ViT encoder found (no patch_embed.proj.weight / pos_embed)")
        width, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
        depth = self._depth("blocks")
        try:
            grid, _ = pos_embed_grid(sd["pos_embed"])  # detectron2's keeps a cls row without a cls_token
        except ValueError:
            grid = None
        name = arch_from_width(width)
        arch = dict(embed_dim=width, depth=depth, patch_size=patch, in_chans=in_chans,
                    img_size=grid * patch if grid else None,
                    num_heads=self.meta.get("num_heads", ARCHS[name]["num_heads"] if name else None),
                    mlp_ratio=self.tensor("blocks.0.mlp.fc1.weight").shape[0] / width)
        if self.has_decoder:
            arch.update(decoder_embed_dim=self.tensor("decoder_embed.weight").shape[0],
                        decoder_depth=self._depth("decoder_blocks"))
        if self.has_head:
            arch["num_classes"] = sd[self.head_key].shape[0]
        return arch


def detect_format(state_dict: Mapping[str, Any], container: str) -> Optional[Format]:
    """The registered format whose key layout this is; canonical keys are 'mae' in the reference's
    {'model': ...} container and 'timm' when bare."""
    for fmt in FORMATS.values():
        if fmt.name not in ("mae", "timm") and fmt.matches(state_dict):
            return fmt
    if FORMATS["mae"].matches(state_dict):
        return FORMATS["mae" if container == "model" else "timm"]
    return None


def _unwrap(obj: Any, path: Path):
    """(state dict, its container key, the other top-level entries)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    state_dict, container, extras = obj, "", {}
    for key in ("model", "state_dict", "module"):  # reference & detectron2, mmengine, DDP-era files
        if isinstance(obj.get(key), Mapping):
            state_dict, container, extras = obj[key], key, {k: v for k, v in obj.items() if k != key}
            break
    # A state dict taken from a DistributedDataParallel wrapper instead of its module: every key has "module."
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, container, extras


def read_checkpoint(path) -> Checkpoint:
    """Read any recognised checkpoint safely and return it in canonical key names."""
    path = Path(path)
    if path.is_dir():
        return _read_directory(path)
    return parse_checkpoint(path, *read_file(path))


def parse_checkpoint(path, obj: Any, meta: Dict[str, Any]) -> Checkpoint:
    """The checkpoint in what read_file(path) returned: for callers that have read the file already."""
    path = Path(path)
    if meta:  # ours: safetensors with our metadata header, canonical keys
        return Checkpoint(path, "mae_transfer", dict(obj), meta)
    state_dict, container, extras = _unwrap(obj, path)
    fmt = detect_format(state_dict, container)
    if fmt is None:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"{path}: unrecognised checkpoint layout (first keys: {sample}); known formats: "
                              f"{', '.join(FORMATS)}")
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    canonical = fmt.to_canonical(tensors)
    set_aside = sum(v.numel() for v in tensors.values()) - sum(v.numel() for v in canonical.values())
    return Checkpoint(path, fmt.name, canonical, _recorded_settings(extras.get("args"), canonical), extras,
                      set_aside=max(set_aside, 0))


def _recorded_settings(args: Any, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """A training checkpoint's flags (ours: a dict; the reference's: an argparse.Namespace), which say what its
    tensors cannot (its targets, its classifier's pooling and mode), as its metadata. A decoder's head count, which
    shapes no tensor, is the flag's or, by default, that of the model the flags name, where the encoder is that
    model's width."""
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, Mapping):
        return {}
    found = {k: v for k, v in args.items() if v is not None}
    named = re.fullmatch(r"mae_vit_([a-z]+)_patch\d+", str(args.get("model")))
    width = state_dict.get("patch_embed.proj.weight")
    if named and width is not None and arch_from_width(width.shape[0]) == named.group(1):
        found.setdefault("decoder_num_heads", DECODERS[named.group(1)]["decoder_num_heads"])
    return found


def _read_directory(path: Path) -> Checkpoint:
    for fmt in FORMATS.values():
        found = fmt.read_directory(path) if fmt.read_directory else None
        if found is not None:
            tensors, meta = found
            return Checkpoint(path, fmt.name, fmt.to_canonical(tensors), meta)
    raise CheckpointError(f"{path} is a directory, not a checkpoint; the directories read here are HuggingFace "
                          "save_pretrained folders (config.json + model.safetensors)")


# Canonical layouts. 'mae': the reference's released files ({'model': ...}); 'timm': the same keys, bare.
def _is_canonical(sd: Mapping[str, Any]) -> bool:
    return "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


register(Format("mae", "MAE reference layout ({'model': state_dict}); encoder-only, full, visualize or finetuned",
                _is_canonical))
register(Format("timm", "timm VisionTransformer state dict (same names as the reference, no container)",
                _is_canonical))

from . import detectron2  # noqa: E402,F401  (registers the format)
from . import hf  # noqa: E402,F401  (registers the format)
from . import mmseg  # noqa: E402,F401  (registers the format)
