"""The 'hf' format: HuggingFace transformers' ViTMAE (`ViTMAEForPreTraining`, the facebook/vit-mae-* models).

Same network as the reference, other names:
- the fused qkv projection is three Linear layers, attention.attention.{query,key,value}, split along the output
  dimension in q, k, v order (the order timm's and the reference's qkv uses);
- a block's norm1/norm2 are layernorm_before/layernorm_after, attn.proj is attention.output.dense, mlp.fc1/fc2 are
  intermediate.dense/output.dense; encoder tensors sit under 'vit.' (no prefix when saved by `ViTMAEModel`), the
  decoder's under 'decoder.' with decoder_blocks renamed decoder_layers (decoder_encoder.layer in files saved by
  transformers 5, which reads both).
- position tables are copied as they are: transformers' ViTMAE builds exactly the reference's table (the first half
  of the channels encodes the column, as ours; transformers 5 says so, swapping its canonical table's halves).
Architecture hyper-parameters that tensors cannot show (heads, norm_pix_loss, mask ratio) live in config.json:
`hf_config` writes it from ours, `meta_from_config` reads it back. No import of transformers here.
"""
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from . import Checkpoint, Format, register
from ..io import CheckpointError, read_file

__all__ = ["from_canonical", "to_canonical", "hf_config", "meta_from_config", "read_directory", "CONFIG_NAME",
           "WEIGHTS_NAME", "META_TO_CONFIG"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
_LEGACY_WEIGHTS = "pytorch_model.bin"

StateDict = Dict[str, torch.Tensor]

# Canonical module -> HF module, outside the blocks.
_TOP = {"cls_token": "vit.embeddings.cls_token",
        "pos_embed": "vit.embeddings.position_embeddings",
        "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
        "norm": "vit.layernorm",
        "mask_token": "decoder.mask_token",
        "decoder_embed": "decoder.decoder_embed",
        "decoder_pos_embed": "decoder.decoder_pos_embed",
        "decoder_norm": "decoder.decoder_norm",
        "decoder_pred": "decoder.decoder_pred"}
_STACKS = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
# Canonical module -> HF module, inside one transformer block (qkv is split apart, see below).
_BLOCK = {"norm1": "layernorm_before",
          "attn.proj": "attention.output.dense",
          "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense",
          "mlp.fc2": "output.dense"}
_QKV = ("query", "key", "value")
_HF_QKV = "attention.attention"

_CANONICAL_BLOCK_KEY = re.compile(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)")


def _split_leaf(key: str) -> Tuple[str, str]:
    """'decoder_embed.weight' -> ('decoder_embed', '.weight'); a bare parameter such as 'cls_token' -> (key, '')."""
    module, _, leaf = key.rpartition(".")
    return (module, "." + leaf) if leaf in ("weight", "bias") and module else (key, "")


def from_canonical(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Canonical -> ViTMAEForPreTraining names. Tensors ViTMAE has no place for (a classifier head, fc_norm, layer
    scale...) are left out; tools/convert_checkpoint.py reports them."""
    out: StateDict = {}
    for key, value in sd.items():
        block = _CANONICAL_BLOCK_KEY.fullmatch(key)
        if block:
            stack, index, module, leaf = block.groups()
            prefix = f"{_STACKS[stack]}.{index}."
            if module == "attn.qkv":
                for name, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"{prefix}{_HF_QKV}.{name}.{leaf}"] = part.clone()  # own storage: safetensors refuses views
            elif module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{leaf}"] = value
            continue
        module, leaf = _split_leaf(key)
        if module in _TOP:
            out[_TOP[module] + leaf] = value
    return out


_HF_TOP = {v: k for k, v in _TOP.items()}
_HF_BLOCK = {v: k for k, v in _BLOCK.items()}
# transformers 5 keeps the layout above in the files it saves but for the decoder's blocks, which it writes as
# decoder.decoder_encoder.layer.N (it renames its own modules vit.layers -> vit.encoder.layer on saving, and the
# renaming catches decoder_layers too); it reads them back under either name, and so do we.
_HF_STACKS = {**{v: k for k, v in _STACKS.items()}, "decoder.decoder_encoder.layer": "decoder_blocks"}
_HF_BLOCK_KEY = re.compile(rf"({'|'.join(map(re.escape, _HF_STACKS))})\.(\d+)\.(.+)\.(weight|bias)")


def to_canonical(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """ViTMAE names (ViTMAEForPreTraining, or ViTMAEModel without the 'vit.' prefix) -> canonical."""
    if not any(k.startswith("vit.") for k in sd):  # saved by ViTMAEModel: the encoder without its prefix
        sd = {"vit." + k: v for k, v in sd.items()}
    out: StateDict = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        block = _HF_BLOCK_KEY.fullmatch(key)
        if block:
            stack, index, module, leaf = block.groups()
            prefix = f"{_HF_STACKS[stack]}.{index}."
            if module.startswith(_HF_QKV + ".") and module.split(".")[-1] in _QKV:
                qkv.setdefault((prefix + "attn.qkv", leaf), {})[module.split(".")[-1]] = value
            elif module in _HF_BLOCK:
                out[f"{prefix}{_HF_BLOCK[module]}.{leaf}"] = value
            else:
                unknown.append(key)
            continue
        module, leaf = _split_leaf(key)
        if module in _HF_TOP:
            out[_HF_TOP[module] + leaf] = value
        else:
            unknown.append(key)
    for (module, leaf), parts in qkv.items():
        if len(parts) != 3:
            missing = ", ".join(n for n in _QKV if n not in parts)
            raise CheckpointError(f"ViTMAE checkpoint lacks the {missing} projection of {module} ({leaf})")
        out[f"{module}.{leaf}"] = torch.cat([parts[n] for n in _QKV], dim=0)
    if unknown:
        raise CheckpointError("ViTMAE checkpoint has tensors with no counterpart in the MAE model (not a ViTMAE "
                              f"model?): {', '.join(sorted(unknown)[:8])}{' ...' if len(unknown) > 8 else ''}")
    return out


def _matches(keys: Mapping[str, Any]) -> bool:
    return any(f"{p}embeddings.patch_embeddings.projection.weight" in keys
               and f"{p}encoder.layer.0.{_HF_QKV}.query.weight" in keys for p in ("vit.", ""))


# -- config.json ---------------------------------------------------------------------------------------------------
def hf_config(ckpt: Checkpoint) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """ViTMAEConfig fields (as config.json holds them) for the model in `ckpt` (canonical weights + our metadata),
    and those of them that `ckpt` does not record, so were given standard values.

    layer_norm_eps is MAE's 1e-6 unless the source recorded another (the facebook/vit-mae-* configs say 1e-12,
    transformers' default, although the weights were trained with 1e-6). A model without a decoder is written as a
    ViTMAEModel. Raises CheckpointError when a head count is neither recorded nor standard for the width."""
    sd, arch, meta = ckpt.state_dict, ckpt.arch(), ckpt.meta
    assumed: Dict[str, Any] = {}

    def recorded(name: str, value: Any) -> Any:
        if name not in meta:
            assumed[META_TO_CONFIG[name]] = value
        return value

    width = arch["embed_dim"]
    if arch["img_size"] is None:
        raise CheckpointError(f"cannot write a HuggingFace config: {ckpt.path}'s position embedding "
                              f"{tuple(sd['pos_embed'].shape)} is no square grid, and ViTMAE's image_size is square")
    if arch["num_heads"] is None:
        raise CheckpointError(f"cannot write a HuggingFace config: the number of attention heads of this {width}-wide "
                              "encoder is not recorded and it is not a standard ViT width")
    config = dict(
        architectures=["ViTMAEModel"], model_type="vit_mae", hidden_size=width, num_hidden_layers=arch["depth"],
        num_attention_heads=recorded("num_heads", arch["num_heads"]),
        intermediate_size=ckpt.tensor("blocks.0.mlp.fc1.weight").shape[0], hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.02,
        layer_norm_eps=float(recorded("layer_norm_eps", meta.get("layer_norm_eps", 1e-6))), image_size=arch["img_size"],
        patch_size=arch["patch_size"], num_channels=arch["in_chans"], qkv_bias="blocks.0.attn.qkv.bias" in sd,
        mask_ratio=float(recorded("mask_ratio", meta.get("mask_ratio", 0.75))),
        norm_pix_loss=bool(recorded("norm_pix_loss", meta.get("norm_pix_loss", False))),
        torch_dtype=str(sd["pos_embed"].dtype).removeprefix("torch."))
    if ckpt.has_decoder:
        decoder_width = arch["decoder_embed_dim"]
        if ckpt.decoder_num_heads is None:
            raise CheckpointError(f"cannot write a HuggingFace config: the number of attention heads of this "
                                  f"{decoder_width}-wide decoder is not recorded (metadata 'decoder_num_heads')")
        config.update(architectures=["ViTMAEForPreTraining"], decoder_hidden_size=decoder_width,
                      decoder_num_hidden_layers=arch["decoder_depth"],
                      decoder_num_attention_heads=recorded("decoder_num_heads", ckpt.decoder_num_heads),
                      decoder_intermediate_size=ckpt.tensor("decoder_blocks.0.mlp.fc1.weight").shape[0])
    return config, assumed


# Our metadata names -> the config.json fields that hold the same facts.
META_TO_CONFIG = {"num_heads": "num_attention_heads", "decoder_num_heads": "decoder_num_attention_heads",
                  "norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio", "layer_norm_eps": "layer_norm_eps"}


def meta_from_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """What config.json says that the weights cannot, under the metadata names our own checkpoints use (an
    encoder-only ViTMAEModel's decoder fields are defaults that describe nothing, so they are not taken)."""
    has_decoder = "ViTMAEModel" not in config.get("architectures", [])
    return {meta: config[field] for meta, field in META_TO_CONFIG.items()
            if field in config and (has_decoder or meta != "decoder_num_heads")}


# -- a model directory ---------------------------------------------------------------------------------------------
def read_directory(path: Path) -> Optional[Tuple[StateDict, Dict[str, Any]]]:
    """Weights and metadata of a `save_pretrained` directory, or None if `path` holds no config.json.

    Reads model.safetensors, its shards (model.safetensors.index.json) or a legacy pytorch_model.bin, all safely."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object (found {type(config).__name__})")
    if config.get("model_type") != "vit_mae":
        raise CheckpointError(f"{path}: a HuggingFace {config.get('model_type')!r} model; only ViTMAE ('vit_mae') "
                              "directories are supported")
    if (path / WEIGHTS_NAME).is_file():
        files = [path / WEIGHTS_NAME]
    elif (path / _SHARD_INDEX).is_file():
        try:
            weight_map = json.loads((path / _SHARD_INDEX).read_text())["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:  # not JSON, or not its objects
            raise CheckpointError(f"{path / _SHARD_INDEX}: not a safetensors shard index ({e})") from None
    elif (path / _LEGACY_WEIGHTS).is_file():
        files = [path / _LEGACY_WEIGHTS]
    else:
        raise CheckpointError(f"{path}: config.json but no weights ({WEIGHTS_NAME}, {_SHARD_INDEX} or "
                              f"{_LEGACY_WEIGHTS})")
    tensors: StateDict = {}
    for file in files:
        obj, _ = read_file(file)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{file}: expected a dict of tensors, found {type(obj).__name__}")
        tensors.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    return tensors, meta_from_config(config)


register(Format("hf", "HuggingFace transformers ViTMAE (ViTMAEForPreTraining / ViTMAEModel; a save_pretrained "
                "directory or its weights file)", _matches, to_canonical, from_canonical, read_directory))
