"""The 'hf' format against transformers' own ViTMAE (a test-only dependency): the same network, to 1e-4."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

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


def test_transformers_builds_our_model_from_the_converted_directory(tmp_path, capsys):
    ours = tiny_mae(norm_pix_loss=True)
    src = save_checkpoint(tmp_path / "ours.safetensors", ours.state_dict(), META)
    assert convert_tool.main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    # Every config field the source does not record is named (META records the others).
    assert "assumed (not recorded in the source; edit the written config if the model differs): " \
           "layer_norm_eps=1e-06\n" in capsys.readouterr().out
    assert listing(tmp_path) == ["hf", "ours.safetensors"] and listing(tmp_path / "hf") == ["config.json",
                                                                                             "model.safetensors"]

    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])  # lists (4.x) or sets
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
    # format copies them as they are. transformers' own table, as its ViTMAE embeddings build it (a freshly built
    # ViTMAEForPreTraining zeroes its decoder table, and transformers 5 skips the encoder's too):
    embeddings = ViTMAEEmbeddings(hf_tiny_config(hidden_size=128))
    embeddings.initialize_weights()
    torch.testing.assert_close(embeddings.position_embeddings.detach(), sincos_pos_embed_2d(128, (4, 4)))
    torch.testing.assert_close(ckpt.state_dict["pos_embed"], hf.vit.embeddings.position_embeddings.detach())
    torch.testing.assert_close(ckpt.state_dict["decoder_pos_embed"], hf.decoder.decoder_pos_embed.detach())

    ours = tiny_mae(norm_pix_loss=True)
    load_into(ours, ckpt.state_dict, dropped=())
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, _ = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(pred, out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)


def test_the_decoder_names_of_transformers_4_and_5_read_alike(tmp_path):
    # transformers 5 (5.24 seen) saves a ViTMAEForPreTraining as 4.x did but for the decoder's blocks, which it
    # names decoder.decoder_encoder.layer.N where 4.x wrote decoder.decoder_layers.N. Write the file both ways.
    torch.manual_seed(0)
    ViTMAEForPreTraining(hf_tiny_config()).save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    names = {4: "decoder.decoder_layers.", 5: "decoder.decoder_encoder.layer."}
    states = {}
    for version, other in ((4, 5), (5, 4)):
        (tmp_path / str(version)).mkdir()
        shutil.copy(tmp_path / "saved" / "config.json", tmp_path / str(version))
        renamed = {k.replace(names[other], names[version]): v for k, v in saved.items()}
        save_file(renamed, tmp_path / str(version) / "model.safetensors")
        states[version] = read_checkpoint(tmp_path / str(version)).state_dict
    assert states[4].keys() == states[5].keys() and all(torch.equal(states[4][k], states[5][k]) for k in states[4])
    # 2 decoder blocks of 16 tensors in transformers' layout, of 12 in ours (q, k and v fused)
    assert sum(k.startswith(tuple(names.values())) for k in saved) == 2 * 16
    assert sum(k.startswith("decoder_blocks.") for k in states[5]) == 2 * 12


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
    assert not (info["missing_keys"] or info["unexpected_keys"])
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, _ = ours.forward_masked(imgs, 0.75, noise=noise)
        out = hf.eval()(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.last_hidden_state, latent, atol=1e-4, rtol=0)
    assert torch.equal(out.mask, mask)

    # ViTMAEModel.save_pretrained writes the encoder without the 'vit.' prefix, in safetensors shards or (before
    # transformers 5, as the older Hub models are) in a pytorch_model.bin: each reads back all the same.
    hf.save_pretrained(tmp_path / "hf_shards", max_shard_size="1MB")
    assert "model.safetensors.index.json" in listing(tmp_path / "hf_shards")
    (tmp_path / "hf_bin").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "hf_bin")
    torch.save(load_file(tmp_path / "hf" / "model.safetensors"), tmp_path / "hf_bin" / "pytorch_model.bin")
    for saved in ("hf_shards", "hf_bin"):
        back = read_checkpoint(tmp_path / saved)
        assert (back.format, back.kind) == ("hf", "encoder") and "decoder_num_heads" not in back.meta
        assert sorted(back.state_dict) == sorted(ours.encoder_state_dict())
        assert all(torch.equal(v, ours.encoder_state_dict()[k]) for k, v in back.state_dict.items())


@pytest.mark.parametrize("damage", ["config", "config_not_object", "shard_index_not_object", "weights", "model_type"])
def test_damaged_hf_directories_are_named_in_the_error(tmp_path, damage):
    ViTMAEModel(hf_tiny_config()).save_pretrained(tmp_path / "hf")
    if damage == "config":
        (tmp_path / "hf" / "config.json").write_text("{not json")
        match = "config.json: not valid JSON"
    elif damage == "config_not_object":
        (tmp_path / "hf" / "config.json").write_text("[1, 2]")
        match = r"config.json: not a JSON object \(found list\)"
    elif damage == "shard_index_not_object":
        (tmp_path / "hf" / "model.safetensors").unlink()
        (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
        match = "model.safetensors.index.json: not a safetensors shard index"
    elif damage == "weights":
        (tmp_path / "hf" / "model.safetensors").unlink()
        match = "config.json but no weights"
    else:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
        match = "only ViTMAE"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(tmp_path / "hf")


def test_trained_norms_land_on_transformers_own_norms(tmp_path):
    # every LayerNorm away from its init of ones and zeros, where norm1 and norm2 would be interchangeable
    ours = tiny_mae(norm_pix_loss=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    src = save_checkpoint(tmp_path / "ours.safetensors", ours.state_dict(), META)
    assert convert_tool.main([str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, _ = ours(imgs, mask_ratio=0.75, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.logits, pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, loss, atol=1e-4, rtol=0)


def test_an_encoder_without_qkv_biases_says_so_in_its_config(tmp_path):
    ours = tiny_mae(qkv_bias=False)
    assert "blocks.0.attn.qkv.bias" not in ours.encoder_state_dict()
    torch.save({"model": ours.encoder_state_dict()}, tmp_path / "encoder.pth")
    assert convert_tool.main([str(tmp_path / "encoder.pth"), str(tmp_path / "hf"), "--to", "hf", "--encoder-only"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["qkv_bias"] is False
    hf, info = ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"])  # no randomly initialised biases added
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        latent, _, _ = ours.forward_masked(imgs, 0.75, noise=noise)
        out = hf.eval()(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(out.last_hidden_state, latent, atol=1e-4, rtol=0)
