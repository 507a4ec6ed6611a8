"""Loading weights into a ViTDet model by exact names, and saving its training checkpoints atomically.

detectron2 loads an MAE encoder with `?matching_heuristics=True`: keys are matched by suffix, which maps the
encoder's final norm onto pyramid norms and floods the log with missing/unexpected keys (detectron2 issues 4641,
4566). Here every tensor has one place, decided by the 'detectron2' checkpoint format, and one report says what
was loaded, what is new and what was dropped. The checkpointer accepts two kinds of checkpoint:

- an encoder in any format that mae_transfer.checkpoints recognises (MAE reference, timm, ours, a HuggingFace
  ViTMAE directory, ...) for `train.init_checkpoint`: its tensors go under backbone.net, with the patch embedding
  interpolated as ViTDet did (ViT-H/14 -> 16) and the position-embedding grid resized where the model's differ;
- a checkpoint of the whole detector, as this checkpointer saves it or as detectron2's model zoo ships it (a .pkl of
  numpy arrays, read safely by mae_transfer.checkpoints), for --resume and --eval-only: loaded 1:1.
  With `new_classes` (training from a detector: train.init_checkpoint), a detector trained for another number of
  classes (COCO's 80 -> a dataset of K) starts its class-specific predictors afresh, as detectron2's own loading
  allows (it skips any mis-shaped tensor; here only those, and only in their class dimension).
"""
import logging
import os
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from ..checkpoints import (Checkpoint, CheckpointError, LoadReport, atomic_path, load_into, load_whole_model,
                           parse_checkpoint, read_checkpoint, read_file, save_training_state)
from ..checkpoints.formats.detectron2 import PREFIX, detectron2_name
from ..models import arch_from_width, fit_pos_embed, interpolate_patch_embed, pos_embed_grid

__all__ = ["ViTDetCheckpointer", "encoder_to_detectron2", "load_encoder"]

logger = logging.getLogger(__name__)

# Model tensors that no encoder checkpoint holds: ViTDet's additions inside the ViT, and everything around it.
_NEW_IN_VIT = (PREFIX + "blocks.*.attn.rel_pos_h", PREFIX + "blocks.*.attn.rel_pos_w", PREFIX + "blocks.*.residual.*")


def _vit_shape(model_sd: Dict[str, torch.Tensor], source: str) -> Tuple[int, int, int]:
    """(width, depth, patch size) of the ViT under backbone.net."""
    key = PREFIX + "patch_embed.proj.weight"
    if key not in model_sd:
        raise CheckpointError(f"cannot load the encoder {source}: the model has no detectron2 ViT at {PREFIX[:-1]!r}")
    width, _, patch, _ = model_sd[key].shape
    depth = len({k.split(".")[3] for k in model_sd if k.startswith(PREFIX + "blocks.")})
    return width, depth, patch


def _describe(width: int, depth: int) -> str:
    name = arch_from_width(width)
    return f"{'ViT-' + name if name else 'a ViT'} ({width} wide, {depth} blocks)"


def encoder_to_detectron2(ckpt: Checkpoint, model_sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor],
                                                                                          List[str]]:
    """The checkpoint's tensors named for a ViTDet model with state dict `model_sd`, and notes on what was adapted.

    Encoder tensors get their detectron2 names; the patch embedding is interpolated as ViTDet did (ViT-H/14 -> 16) and
    the position embedding's grid resized bicubically when the model's patch size or pretraining grid differ.
    Tensors with no place in the detector (cls token, final norm, decoder, classifier) keep their canonical names.
    """
    sd, source = ckpt.state_dict, str(ckpt.path)
    arch = ckpt.arch()
    width, depth, patch = _vit_shape(model_sd, source)
    if (arch["embed_dim"], arch["depth"]) != (width, depth):
        raise CheckpointError(
            f"{source} holds {_describe(arch['embed_dim'], arch['depth'])} but the config builds "
            f"{_describe(width, depth)} (model.backbone.net): use the det_configs file of the checkpoint's size, or "
            f"set model.backbone.net.embed_dim/depth/num_heads (and window_block_indexes) to match it")
    out = {detectron2_name(k) or k: v for k, v in sd.items()}
    notes = []

    proj = out[PREFIX + "patch_embed.proj.weight"]
    if proj.shape[-1] != patch:
        out[PREFIX + "patch_embed.proj.weight"] = interpolate_patch_embed(proj, [patch, patch])
        notes.append(f"patch_embed.proj.weight interpolated from {proj.shape[-1]}x{proj.shape[-1]} to {patch}x{patch} "
                     f"(bicubic, as ViTDet)")

    pos_key = PREFIX + "pos_embed"
    if pos_key in out and pos_key in model_sd:
        pos = out[pos_key]
        try:
            (old, have_cls), (new, want_cls) = pos_embed_grid(pos), pos_embed_grid(model_sd[pos_key])  # cls row or not
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None
        if (old, have_cls) != (new, want_cls):
            grid = fit_pos_embed(pos[:, have_cls:], (new, new), num_prefix_tokens=0)
            # detectron2's ViT only stores the cls row (get_abs_pos drops it), so its value is never used.
            cls_row = pos[:, :1] if have_cls else pos.new_zeros(1, 1, pos.shape[-1])
            out[pos_key] = torch.cat([cls_row, grid], dim=1) if want_cls else grid
            notes.append(f"pos_embed resized from a {old}x{old} to a {new}x{new} grid")
    return out, notes


def load_encoder(model: nn.Module, ckpt: Checkpoint) -> LoadReport:
    """Load an encoder checkpoint into a ViTDet model; errors on any tensor without its place or of the wrong shape."""
    model_sd = model.state_dict()
    sd, notes = encoder_to_detectron2(ckpt, model_sd)
    new = [*_NEW_IN_VIT, *(k for k in model_sd if not k.startswith(PREFIX))]
    dropped = [k for k in ckpt.state_dict if detectron2_name(k) is None]
    report = load_into(model, sd, new=new, dropped=dropped, source=f"{ckpt.path} ({ckpt.format}, {ckpt.kind})")
    for note in notes:
        logger.info(note)
    return report


def _is_detector_checkpoint(obj) -> bool:
    """A whole-detector checkpoint ({'model': state_dict} with parts beyond the ViT), as detectron2 saves one."""
    model = obj.get("model") if isinstance(obj, dict) else None
    return isinstance(model, dict) and any(k.startswith(PREFIX) for k in model) \
        and any(not k.startswith(PREFIX) for k in model)


# The detector's tensors whose shapes follow the class count (box classifier and regressor, mask predictor).
CLASS_SPECIFIC = ("roi_heads.box_predictor*.cls_score.*", "roi_heads.box_predictor*.bbox_pred.*",
                  "roi_heads.mask_head.predictor.*")


class ViTDetCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer (resume, periodic saving, DDP-aware loading) with exact-name loading
    through mae_transfer.checkpoints, safe reading (no arbitrary unpickling) and atomic saving.

    `new_classes`: a detector checkpoint of another class count may initialise this one (module docstring); off, as
    evaluating or resuming such a checkpoint is a mistake. After a load, `loaded` is the path loaded and
    `loaded_encoder` whether it held an encoder only (a detector's other parts then keep their initialisation)."""

    def __init__(self, model: nn.Module, save_dir: str = "", *, new_classes: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.new_classes = new_classes
        self.loaded: Optional[str] = None
        self.loaded_encoder = False

    def load(self, path: str, *args, **kwargs) -> dict:
        """As DetectionCheckpointer.load, but a missing checkpoint is a FileNotFoundError naming it (fvcore only
        asserts) and a HuggingFace ViTMAE directory loads as an encoder (fvcore's load takes files only)."""
        if not path:
            return super().load(path, *args, **kwargs)
        url = urlparse(path)
        if url.query:
            raise CheckpointError(f"{path}: checkpoints load by exact names here; "
                                  f"drop the '?{url.query}' from the path")
        local = self.path_manager.get_local_path(path)
        if os.path.isdir(local):
            self.logger.info(f"[ViTDetCheckpointer] Loading from {path} ...")
            self.loaded = path
            self._load_model({"model": read_checkpoint(local)})
            return {}  # an encoder directory holds no trainer state or other extra data
        if not os.path.isfile(local):
            resuming = bool(self.save_dir) and self.has_checkpoint() and path == self.get_checkpoint_file()
            source = (f"--resume's checkpoint, named in {os.path.join(self.save_dir, 'last_checkpoint')}"
                      if resuming else "given as train.init_checkpoint")
            raise FileNotFoundError(f"checkpoint not found: {path} ({source})")
        self.loaded = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict:
        obj, meta = read_file(filename)
        if _is_detector_checkpoint(obj):
            return obj
        # An encoder: through the format registry, which has no canonical form for a whole detector.
        return {"model": parse_checkpoint(filename, obj, meta)}

    def _load_model(self, checkpoint: dict) -> None:
        state = checkpoint.pop("model")
        self.loaded_encoder = isinstance(state, Checkpoint)
        if self.loaded_encoder:
            report = load_encoder(self.model, state)
        else:
            report = load_whole_model(self.model, state, source=f"detector checkpoint {self.loaded}",
                                      class_specific=CLASS_SPECIFIC if self.new_classes else (),
                                      warn=self.logger.warning)
        self.logger.info(str(report))
        return None  # load_into refused any missing, unexpected or mis-shaped tensor: nothing left to warn about

    def save(self, name: str, **kwargs) -> None:
        """As fvcore's Checkpointer.save, but written atomically: an interrupted save never leaves a torn file."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                **kwargs}
        path = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(f"Saving checkpoint to {path}")
        save_training_state(path, data)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """As fvcore's, but written atomically: --resume reads this file, and a torn one would name no checkpoint."""
        with atomic_path(os.path.join(self.save_dir, "last_checkpoint")) as tmp:
            tmp.write_text(last_filename_basename)
