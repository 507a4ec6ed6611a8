"""What is in a checkpoint: its format, architecture, parts, size and dtype.

    python tools/inspect_checkpoint.py mae_pretrain_vit_base_full.pth
    python tools/inspect_checkpoint.py output_dir/checkpoint-799.pth
    python tools/inspect_checkpoint.py vit-mae-base/ --json

Reads every format tools/convert_checkpoint.py reads, safely (no pickled code runs).
"""
import argparse
import json
import sys
from collections import Counter
from typing import Any, Dict, Optional, Sequence

from mae_transfer.checkpoints import FORMATS, Checkpoint, CheckpointError, read_checkpoint
from mae_transfer.checkpoints.formats import HEAD_KEYS
from mae_transfer.models import ARCHS, DECODERS, MODELS, arch_from_width
from mae_transfer.models.mae import DECODER_KEYS

KINDS = {"full": "encoder + MAE decoder (pretraining)", "encoder": "encoder only",
         "finetuned": "encoder + classification head",
         "linprobe": "encoder + linear-probe head (BatchNorm1d without affine, then Linear)"}
# Formats that hold whole detectors or segmentors: the ViT is read as an encoder and their other parts set aside.
WHOLE_MODELS = {"detectron2": "detector", "mmseg": "segmentor", "mae_transfer_seg": "segmentor"}


def builder(ckpt: Checkpoint, arch: Dict[str, Any]) -> Optional[str]:
    """The create_model(...) call that builds this architecture (build_classifier(...) for a linear probe): the
    builder of its width, with every argument that differs from that builder's defaults. None for a width we have
    no builder for, or unknown head counts."""
    size = arch_from_width(arch["embed_dim"])
    prefix = "mae_" if ckpt.has_decoder else ""
    name = next((n for n in MODELS if n.startswith(f"{prefix}vit_{size}_patch")), None)
    if (name is None or arch["num_heads"] is None or arch["img_size"] is None
            or (ckpt.has_decoder and ckpt.decoder_num_heads is None)):
        return None
    defaults = {**ARCHS[size], "patch_size": int(name.rsplit("patch", 1)[1]), "img_size": 224, "mlp_ratio": 4.0,
                **(DECODERS[size] if ckpt.has_decoder else {})}
    wanted = {k: arch[k] for k in ("depth", "num_heads", "patch_size", "img_size", "mlp_ratio") if k in arch}
    if ckpt.has_decoder:
        wanted.update(decoder_embed_dim=arch["decoder_embed_dim"], decoder_depth=arch["decoder_depth"],
                      decoder_num_heads=ckpt.decoder_num_heads)
    kwargs = {k: v for k, v in wanted.items() if v != defaults[k]}
    global_pool = "fc_norm.weight" in ckpt.state_dict
    if ckpt.kind == "linprobe":  # create_model builds no BatchNorm before the head; build_classifier does
        call = f"build_classifier({name!r}, {arch['num_classes']}, mode='linprobe', global_pool={global_pool}"
        return call + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")"
    if ckpt.has_head:
        kwargs.update(global_pool="avg" if global_pool else "token", num_classes=arch["num_classes"])
    return f"create_model({name!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"


def describe(ckpt: Checkpoint) -> Dict[str, Any]:
    sd = ckpt.state_dict
    part = {"encoder": 0, "decoder": 0, "head": 0}
    for key, value in sd.items():
        part["decoder" if key.startswith(DECODER_KEYS) else "head" if key.startswith(HEAD_KEYS) else "encoder"] += \
            value.numel()
    info: Dict[str, Any] = {
        "path": str(ckpt.path), "format": ckpt.format, "format_summary": FORMATS[ckpt.format].summary
        if ckpt.format in FORMATS else "ours: safetensors with metadata", "kind": ckpt.kind,
        "present": {"encoder": part["encoder"] > 0, "decoder": ckpt.has_decoder, "head": ckpt.has_head,
                    "optimizer_state": "optimizer" in ckpt.extras,
                    "epoch": ckpt.extras.get("epoch", ckpt.meta.get("epoch"))},
        "other_entries": sorted(k for k in ckpt.extras if k not in ("optimizer", "epoch")),
        "tensors": len(sd), "parameters": {k: v for k, v in part.items() if v} | {"total": sum(part.values())},
        "set_aside_parameters": ckpt.set_aside,
        "dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())),
        "meta": {k: v for k, v in ckpt.meta.items() if not isinstance(v, (dict, list))},
    }
    try:
        arch = ckpt.arch()
    except CheckpointError as e:
        info["architecture"], info["error"] = None, str(e)
        return info
    arch["num_heads_source"] = ("recorded" if "num_heads" in ckpt.meta else
                                "standard for this width" if arch["num_heads"] is not None else "unknown")
    if ckpt.has_decoder:
        arch["decoder_num_heads"] = ckpt.decoder_num_heads
    info["architecture"] = arch
    info["builder"] = builder(ckpt, arch)
    return info


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def render(info: Dict[str, Any]) -> str:
    kind = f"{info['kind']}: {KINDS[info['kind']]}"
    if info["kind"] == "encoder" and info["set_aside_parameters"] and info["format"] in WHOLE_MODELS:
        kind = f"{WHOLE_MODELS[info['format']]}: a whole {WHOLE_MODELS[info['format']]}, its ViT read as the encoder"
    rows = [("format", f"{info['format']}: {info['format_summary']}"), ("kind", kind)]
    a = info["architecture"]
    if a is None:
        rows.append(("architecture", info["error"]))
    else:
        heads = a["num_heads"] if a["num_heads"] is not None else "?"
        side = a["img_size"] // a["patch_size"] if a["img_size"] else None
        image = (f"image {a['img_size']} ({side}x{side} patches)" if side else
                 "image size unknown (a position table for a non-square patch grid)")
        rows.append(("architecture", f"ViT width {a['embed_dim']}, depth {a['depth']}, heads {heads} "
                                     f"({a['num_heads_source']}), patch {a['patch_size']}, {image}, "
                                     f"mlp ratio {a['mlp_ratio']:g}, {a['in_chans']} channels"))
        if "decoder_embed_dim" in a:
            heads = a["decoder_num_heads"] if a["decoder_num_heads"] is not None else "?"
            rows.append(("decoder", f"width {a['decoder_embed_dim']}, depth {a['decoder_depth']}, heads {heads}"))
        if "num_classes" in a:
            rows.append(("head", f"{a['num_classes']} classes"))
        if info["builder"]:
            rows.append(("builds with", info["builder"]))
    present = info["present"]
    epoch = present["epoch"]
    rows.append(("contains", ", ".join(f"{name} {'yes' if present[part] else 'no'}"
                                       for part, name in (("encoder", "encoder"), ("decoder", "MAE decoder"),
                                                          ("head", "classifier head")))
                 + f", optimizer state {'yes' if present['optimizer_state'] else 'no'}"
                 + f", epoch {epoch if epoch is not None else 'not recorded'}"))
    if info["other_entries"]:
        rows.append(("also", ", ".join(info["other_entries"])))
    params = info["parameters"]
    parts = ", ".join(f"{k} {_millions(v)}" for k, v in params.items() if k != "total")
    rows.append(("parameters", f"{_millions(params['total'])} in {info['tensors']} tensors ({parts})"))
    if info["set_aside_parameters"]:
        rows.append(("outside ViT", f"{_millions(info['set_aside_parameters'])} more parameters (a detector's "
                                    f"pyramid and heads, a segmentor's neck and heads, relative positions): whole-"
                                    f"model loading (train_det.py, test_seg.py) takes them, conversion leaves them"))
    rows.append(("dtype", ", ".join(f"{d} ({n} tensors)" if len(info["dtypes"]) > 1 else d
                                    for d, n in info["dtypes"].items())))
    if info["meta"]:  # a training checkpoint's: the flags of the run that saved it
        rows.append(("settings" if "args" in info["other_entries"] else "metadata",
                     ", ".join(f"{k}={v}" for k, v in sorted(info["meta"].items()))))
    return "\n".join([info["path"]] + [f"  {name:<14}{text}" for name, text in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="checkpoint file, or a HuggingFace ViTMAE model directory")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args(argv)
    try:
        info = describe(read_checkpoint(args.path))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
