"""tools/inspect_checkpoint.py: format, architecture, parts, parameter count and dtype of any checkpoint."""
import argparse
import json
import pickle
from pathlib import Path

import torch
from detectron2.config import LazyConfig, instantiate

from convert_helpers import load_tool, tiny_mae
from mae_transfer.checkpoints import load_into, read_checkpoint, save_checkpoint
from mae_transfer.cls import build_classifier
from mae_transfer.models import create_model, vit_tiny_patch16

inspect_tool = load_tool("inspect_checkpoint")
ROOT = Path(__file__).resolve().parents[1]


def inspect(capsys, path, *flags):
    assert inspect_tool.main([str(path), *flags]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in flags else out


def numel(sd) -> int:
    return sum(v.numel() for v in sd.values())


def test_a_reference_training_checkpoint(tmp_path, capsys):
    mae = tiny_mae()
    sd = mae.state_dict()
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_tiny_patch16")}, path)
    info = inspect(capsys, path, "--json")
    assert (info["format"], info["kind"]) == ("mae", "full")
    assert info["present"] == {"encoder": True, "decoder": True, "head": False, "optimizer_state": True,
                               "epoch": 799}
    assert info["other_entries"] == ["args", "scaler"]
    encoder = numel(mae.encoder_state_dict())
    assert info["parameters"] == {"encoder": encoder, "decoder": numel(sd) - encoder, "total": numel(sd)}
    assert info["tensors"] == len(sd) and info["dtypes"] == {"float32": len(sd)}
    arch = info["architecture"]
    assert (arch["embed_dim"], arch["depth"], arch["num_heads"], arch["patch_size"], arch["img_size"]) == (
        192, 2, 3, 8, 32)
    assert (arch["decoder_embed_dim"], arch["decoder_depth"], arch["decoder_num_heads"]) == (128, 2, 4)
    assert arch["num_heads_source"] == "standard for this width"

    text = inspect(capsys, path)
    assert "  kind          full: encoder + MAE decoder (pretraining)" in text
    assert "ViT width 192, depth 2, heads 3 (standard for this width), patch 8, image 32 (4x4 patches)" in text
    assert "  decoder       width 128, depth 2, heads 4" in text
    assert "optimizer state yes, epoch 799" in text
    assert "  settings      decoder_num_heads=4, model=mae_vit_tiny_patch16" in text  # its flags, and their heads
    assert "  builds with   create_model('mae_vit_tiny_patch16', depth=2, patch_size=8, img_size=32)" in text
    assert f"  parameters    {numel(sd) / 1e6:.2f}M in {len(sd)} tensors" in text


def test_the_builder_it_prints_builds_a_model_the_checkpoint_loads_into(tmp_path, capsys):
    model = vit_tiny_patch16(img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10).half()
    torch.save(model.state_dict(), tmp_path / "vit_tiny_ft.pth")
    info = inspect(capsys, tmp_path / "vit_tiny_ft.pth", "--json")
    assert (info["format"], info["kind"]) == ("timm", "finetuned")
    assert info["architecture"]["num_classes"] == 10 and info["dtypes"] == {"float16": len(model.state_dict())}
    assert info["builder"] == ("create_model('vit_tiny_patch16', depth=2, patch_size=8, img_size=32, "
                               "global_pool='avg', num_classes=10)")
    built = eval(info["builder"], {"create_model": create_model})  # noqa: S307 (our own output)
    load_into(built, read_checkpoint(tmp_path / "vit_tiny_ft.pth").state_dict, dropped=())
    assert "  dtype         float16" in inspect(capsys, tmp_path / "vit_tiny_ft.pth")

    mae = tiny_mae(decoder_num_heads=8)
    save_checkpoint(tmp_path / "mae.safetensors", mae.state_dict(), {"decoder_num_heads": 8})
    info = inspect(capsys, tmp_path / "mae.safetensors", "--json")
    assert info["builder"] == ("create_model('mae_vit_tiny_patch16', depth=2, patch_size=8, img_size=32, "
                               "decoder_num_heads=8)")
    load_into(eval(info["builder"], {"create_model": create_model}), mae.state_dict(), dropped=())  # noqa: S307


def test_a_linear_probe_is_recognised_with_its_class_count_and_builder(tmp_path, capsys):
    probe = build_classifier("vit_tiny_patch16", 7, mode="linprobe", global_pool=False, img_size=32, patch_size=8,
                             depth=2)
    save_checkpoint(tmp_path / "classifier.safetensors", probe.state_dict(), {"mode": "linprobe"})
    info = inspect(capsys, tmp_path / "classifier.safetensors", "--json")
    assert info["kind"] == "linprobe" and info["present"]["head"] and info["architecture"]["num_classes"] == 7
    assert info["builder"] == ("build_classifier('vit_tiny_patch16', 7, mode='linprobe', global_pool=False, "
                               "depth=2, patch_size=8, img_size=32)")
    built = eval(info["builder"], {"build_classifier": build_classifier})  # noqa: S307 (our own output)
    load_into(built, probe.state_dict(), dropped=())
    text = inspect(capsys, tmp_path / "classifier.safetensors")
    assert "  kind          linprobe: encoder + linear-probe head" in text and "  head          7 classes" in text


def test_a_missing_block_is_reported_not_read_as_a_shallower_or_complete_model(tmp_path, capsys):
    sd = {k: v for k, v in tiny_mae(depth=4).encoder_state_dict().items() if not k.startswith("blocks.2.")}
    torch.save({"model": sd}, tmp_path / "enc.pth")
    info = inspect(capsys, tmp_path / "enc.pth", "--json")
    assert info["architecture"] is None
    assert info["error"].endswith("enc.pth: incomplete encoder checkpoint: blocks.0..3 must all hold the same "
                                  "tensors; block(s) 2 lack blocks.2.*")
    assert "  architecture  " + info["error"] in inspect(capsys, tmp_path / "enc.pth")


def test_hf_directory_and_unreadable_input(tmp_path, capsys):
    convert_tool = load_tool("convert_checkpoint")
    torch.save({"model": tiny_mae().state_dict()}, tmp_path / "full.pth")
    assert convert_tool.main([str(tmp_path / "full.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    text = inspect(capsys, tmp_path / "hf")
    assert "  format        hf: " in text and "heads 3 (recorded)" in text and "layer_norm_eps=1e-06" in text

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert inspect_tool.main([str(tmp_path / "junk.pth")]) == 1
    assert "junk.pth: " in capsys.readouterr().err


def test_a_detector_reports_the_parameters_outside_its_vit(tmp_path, capsys):
    # a ViTDet Mask R-CNN as detectron2's model zoo ships it: the ViT is read, the rest is counted, not hidden
    # (a residual conv block in one block, as residual_block_indexes adds, is the detector's too)
    cfg = LazyConfig.load(str(ROOT / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"))
    cfg.model.backbone.net.update(depth=2, window_block_indexes=[0], residual_block_indexes=[1])
    detector = instantiate(cfg.model).state_dict()
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in detector.items()}, "__author__": "Detectron2 Model Zoo"}, f)
    info = inspect(capsys, path, "--json")
    vit = {k: v for k, v in detector.items()
           if k.startswith("backbone.net.") and ".rel_pos_" not in k and ".residual." not in k}
    assert info["architecture"]["depth"] == 2
    assert info["format"] == "detectron2" and info["parameters"]["total"] == numel(vit)
    assert info["set_aside_parameters"] == numel(detector) - numel(vit) > 0
    text = inspect(capsys, path)
    assert "more parameters (a detector's pyramid and heads" in text
    assert "kind          detector: a whole detector, its ViT read as the encoder" in text


def test_a_non_square_position_table_is_shown_as_such(tmp_path, capsys):
    vit = vit_tiny_patch16(img_size=(32, 48), depth=2)  # a cls row over 2 x 3 patches: 7 rows
    out = inspect(capsys, save_checkpoint(tmp_path / "crops.safetensors", vit.state_dict(), {"num_heads": 3}))
    assert "patch 16, image size unknown (a position table for a non-square patch grid)" in out
    assert "builds with" not in out  # no create_model call can say which grid


def test_our_pretraining_export_shows_the_epoch_its_metadata_records(tmp_path, capsys):
    # main_pretrain.py writes encoder.safetensors with {"model", "epoch", ...} in its metadata header
    path = save_checkpoint(tmp_path / "encoder.safetensors", tiny_mae().encoder_state_dict(),
                           {"model": "mae_vit_tiny_patch16", "epoch": 19, "kind": "encoder"})
    assert inspect(capsys, path, "--json")["present"]["epoch"] == 19
    assert "optimizer state no, epoch 19" in inspect(capsys, path)


def test_an_encoder_converted_for_detectron2_is_an_encoder_not_a_whole_detector(tmp_path, capsys):
    src = save_checkpoint(tmp_path / "encoder.safetensors", tiny_mae().encoder_state_dict(), {"num_heads": 3})
    assert load_tool("convert_checkpoint").main([str(src), str(tmp_path / "vit_d2.pth"), "--to", "detectron2"]) == 0
    capsys.readouterr()
    info = inspect(capsys, tmp_path / "vit_d2.pth", "--json")
    assert (info["format"], info["kind"], info["set_aside_parameters"]) == ("detectron2", "encoder", 0)
    assert "  kind          encoder: encoder only\n" in inspect(capsys, tmp_path / "vit_d2.pth")
