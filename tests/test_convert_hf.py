"""The 'hf' format against transformers' own ViTMAE (a test-only dependency): the same network, to 1e-4."""
import json

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.models.vit_mae.modeling_vit_mae import get_2d_sincos_pos_embed

from convert_helpers import listing, load_tool, tiny_mae
from mae_transfer.checkpoints import CheckpointError, load_into, read_checkpoint, save_checkpoint
from mae_transfer.models import sincos_pos_embed_2d

convert_tool = load_tool("convert_checkpoint")

META = {"num_heads": 3, "decoder_num_heads": 4, "norm_pix_loss": True, "mask_ratio": 0.75}


def hf_tiny_config(**kw) -> ViTMAEConfig:
    """transformers' description of tiny_mae(); layer_norm_eps 1e-6 as MAE's (the HF default is 1e-12)."""
    return ViTMAEConfig(**{**dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
                                  image_size=32, patch_size=8, decoder_hidden_size=128, decoder_num_hidden_layers=2,
                                  decoder_num_attention_heads=4, decoder_intermediate_size=512, layer_norm_eps=1e-6,
                                  norm_pix_loss=True), **kw})


def test_transformers_builds_our_model_from_the_converted_directory(tmp_path):
    ours = tiny_mae(norm_pix_loss=True)
    src = save_checkpoint(tmp_path / "ours.safetensors", ours.state_dict(), META)
    assert convert_tool.main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert listing(tmp_path) == ["hf", "ours.safetensors"] and listing(tmp_path / "hf") == ["config.json",
                                                                                             "model.safetensors"]

    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == ([], [], [])
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss and hf.config.num_attention_heads == 3
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf.eval()(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.logits, pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-4, rtol=0)
    assert torch.equal(out.mask, mask)


def test_a_transformers_saved_model_reads_as_ours(tmp_path):
    torch.manual_seed(0)
    hf = ViTMAEForPreTraining(hf_tiny_config()).eval()
    hf.save_pretrained(tmp_path / "hf")
    ckpt = read_checkpoint(tmp_path / "hf")
    assert (ckpt.format, ckpt.kind) == ("hf", "full")
    assert ckpt.meta == {"num_heads": 3, "decoder_num_heads": 4, "norm_pix_loss": True, "mask_ratio": 0.75,
                         "layer_norm_eps": 1e-6}
    # transformers' sin-cos tables are the reference's (first half of the channels = the column index), so the
    # format copies them as they are. (A freshly built ViTMAEForPreTraining zeroes its decoder table, hence the
    # second check on transformers' table function itself.)
    torch.testing.assert_close(ckpt.state_dict["pos_embed"], sincos_pos_embed_2d(192, (4, 4)))
    hf_table = torch.from_numpy(get_2d_sincos_pos_embed(128, 4, add_cls_token=True)).float().unsqueeze(0)
    torch.testing.assert_close(hf_table, sincos_pos_embed_2d(128, (4, 4)))

    ours = tiny_mae(norm_pix_loss=True)
    load_into(ours, ckpt.state_dict, dropped=())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, _ = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(pred, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)


def test_encoder_only_goes_to_a_vitmae_model_both_ways(tmp_path):
    ours = tiny_mae()
    src = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": ours.encoder_state_dict()}, src)
    # A ViTMAEForPreTraining would get a random decoder: refused, nothing written.
    assert convert_tool.main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 1
    assert listing(tmp_path) == ["mae_pretrain_vit_tiny.pth"]

    assert convert_tool.main([str(src), str(tmp_path / "hf"), "--to", "hf", "--encoder-only"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    hf, info = ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"]) == ([], [])
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, _ = ours.forward_masked(imgs, 0.75, noise=noise)
        out = hf.eval()(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.last_hidden_state, latent, atol=1e-4, rtol=0)
    assert torch.equal(out.mask, mask)

    # ViTMAEModel.save_pretrained writes the encoder without the 'vit.' prefix, in safetensors shards or as a
    # legacy pytorch_model.bin: each reads back all the same.
    hf.save_pretrained(tmp_path / "hf_shards", max_shard_size="1MB")
    hf.save_pretrained(tmp_path / "hf_bin", safe_serialization=False)
    assert "model.safetensors.index.json" in listing(tmp_path / "hf_shards")
    assert "pytorch_model.bin" in listing(tmp_path / "hf_bin")
    for saved in ("hf_shards", "hf_bin"):
        back = read_checkpoint(tmp_path / saved)
        assert (back.format, back.kind) == ("hf", "encoder") and "decoder_num_heads" not in back.meta
        assert sorted(back.state_dict) == sorted(ours.encoder_state_dict())
        assert all(torch.equal(v, ours.encoder_state_dict()[k]) for k, v in back.state_dict.items())


@pytest.mark.parametrize("damage", ["config", "weights", "model_type"])
def test_damaged_hf_directories_are_named_in_the_error(tmp_path, damage):
    ViTMAEModel(hf_tiny_config()).save_pretrained(tmp_path / "hf")
    if damage == "config":
        (tmp_path / "hf" / "config.json").write_text("{not json")
        match = "config.json: not valid JSON"
    elif damage == "weights":
        (tmp_path / "hf" / "model.safetensors").unlink()
        match = "config.json but no weights"
    else:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
        match = "only ViTMAE"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / "hf")
