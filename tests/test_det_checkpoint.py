"""MAE checkpoints into the ViTDet detector: every tensor by exact name, one report of what is loaded, new and
dropped, position and patch embeddings adapted, and a clear error for a checkpoint of another size."""
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from mae_transfer.checkpoints import FORMATS, CheckpointError, read_checkpoint
from mae_transfer.checkpoints.convert import convert, write
from mae_transfer.det import ViTDetCheckpointer, load_encoder
from mae_transfer.models import mae_vit_tiny_patch16, vit_small_patch16, vit_tiny_patch16

CONFIG = Path(__file__).resolve().parents[1] / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"
DEPTH = 2
ENCODER_ONLY = ("cls_token", "norm.weight", "norm.bias")  # no place in detectron2's ViT


@pytest.fixture(scope="module")
def detector_cfg():
    """The tiny config with 2 blocks (the first windowed, the second global): 64 px pretraining, patch 16."""
    cfg = LazyConfig.load(str(CONFIG))
    cfg.model.backbone.net.update(depth=DEPTH, window_block_indexes=[0])
    return cfg


def _save_reference(path: Path, state_dict) -> Path:
    torch.save({"model": state_dict}, path)  # as the MAE reference's main_pretrain.py writes it
    return path


def test_every_pretrained_tensor_lands_in_place_and_the_report_is_exact(detector_cfg, tmp_path):
    mae = mae_vit_tiny_patch16(img_size=64, depth=DEPTH)  # the full pretraining model: encoder and decoder
    sd = mae.state_dict()
    path = _save_reference(tmp_path / "checkpoint-19.pth", sd)
    model = instantiate(detector_cfg.model)
    report = load_encoder(model, read_checkpoint(path))

    model_sd = model.state_dict()
    encoder_keys = [k for k in mae.encoder_state_dict() if k not in ENCODER_ONLY]
    assert len(encoder_keys) == 3 + 12 * DEPTH  # patch_embed.proj.{weight,bias}, pos_embed; 6 weights, 6 biases a block
    for k in encoder_keys:
        assert torch.equal(model_sd["backbone.net." + k], sd[k]), k
    assert sorted(report.loaded) == sorted("backbone.net." + k for k in encoder_keys)

    rel_pos = {f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(DEPTH) for a in "hw"}
    detector_parts = {k for k in model_sd if not k.startswith("backbone.net.")}
    assert any(k.startswith("backbone.simfp_") for k in detector_parts)
    assert any(k.startswith("roi_heads.mask_head.") for k in detector_parts)
    assert set(report.new) == rel_pos | detector_parts
    decoder = {k for k in sd if k == "mask_token" or k.startswith("decoder_")}
    assert len(decoder) > 0
    assert set(report.dropped) == set(ENCODER_ONLY) | decoder
    text = str(report)
    assert "new (not in the checkpoint" in text and "dropped (in the checkpoint" in text and "decoder_blocks" in text


def test_checkpointer_loads_an_encoder_and_round_trips_a_detector(detector_cfg, tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()
    model = instantiate(detector_cfg.model)
    ViTDetCheckpointer(model).load(str(_save_reference(tmp_path / "mae_pretrain_vit_tiny.pth", encoder)))
    assert torch.equal(model.state_dict()["backbone.net.blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"])

    ViTDetCheckpointer(model, str(tmp_path)).save("model_final")
    fresh = instantiate(detector_cfg.model)
    ViTDetCheckpointer(fresh).load(str(tmp_path / "model_final.pth"))  # the whole detector, loaded 1:1
    fresh_sd = fresh.state_dict()
    assert all(torch.equal(v, fresh_sd[k]) for k, v in model.state_dict().items())


def test_a_model_zoo_pkl_loads_as_detectron2_loads_it(detector_cfg, tmp_path):
    # detectron2's model zoo (ViTDet's released Mask R-CNNs among them) ships plain pickles of numpy arrays, which
    # detectron2 unpickles outright; here they are read without unpickling code, and load to the same weights.
    torch.manual_seed(0)
    released = instantiate(detector_cfg.model)
    with torch.no_grad():
        for p in released.parameters():
            p.normal_()  # no tensor left at its initial (often constant) value
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in released.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    ours, theirs = instantiate(detector_cfg.model), instantiate(detector_cfg.model)
    checkpointer = ViTDetCheckpointer(ours)
    checkpointer.load(str(path))
    DetectionCheckpointer(theirs).load(str(path))
    assert not checkpointer.loaded_encoder  # a whole detector, loaded 1:1
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    for k, v in released.state_dict().items():
        assert torch.equal(ours_sd[k], v) and torch.equal(theirs_sd[k], v), k
    # the converter and inspector read it too: the ViT inside, under the encoder's canonical names
    encoder = read_checkpoint(path)
    assert encoder.format == "detectron2"
    assert torch.equal(encoder.state_dict["blocks.1.attn.qkv.weight"], ours_sd["backbone.net.blocks.1.attn.qkv.weight"])


def test_a_detector_of_other_classes_initialises_all_but_its_class_specific_predictors(detector_cfg, tmp_path):
    """Fine-tuning a detector trained on 6 classes on a dataset of 3, as detectron2 allows (it skips mis-shaped
    tensors); every other tensor must still fit exactly."""
    six = instantiate(detector_cfg.model)
    ViTDetCheckpointer(six, str(tmp_path)).save("six")
    cfg = LazyConfig.load(str(CONFIG))
    cfg.model.backbone.net.update(depth=DEPTH, window_block_indexes=[0])
    cfg.model.roi_heads.num_classes = 3
    three = instantiate(cfg.model)
    # evaluating or resuming it would be a mistake: refused unless training starts from it
    with pytest.raises(CheckpointError, match=r"six\.pth does not fit the model; mismatched shapes:\n"
                                              r"  roi_heads\.box_predictor\.cls_score\.weight"):
        ViTDetCheckpointer(three).load(str(tmp_path / "six.pth"))
    checkpointer = ViTDetCheckpointer(three, new_classes=True)
    checkpointer.load(str(tmp_path / "six.pth"))
    afresh = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
              "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
              "roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    loaded, own = six.state_dict(), three.state_dict()
    assert {k for k in own if k in loaded and own[k].shape != loaded[k].shape} == afresh
    assert all(torch.equal(own[k], loaded[k]) for k in own if k not in afresh)
    assert not checkpointer.loaded_encoder and checkpointer.loaded == str(tmp_path / "six.pth")

    cfg.model.roi_heads.num_classes = 6
    cfg.model.roi_heads.box_head.fc_dims = [32]  # another head: not a class count, so still refused
    with pytest.raises(CheckpointError, match=r"six\.pth does not fit the model; mismatched shapes:\n"
                                              r"  roi_heads\.box_head\.fc1\.weight"):
        ViTDetCheckpointer(instantiate(cfg.model), new_classes=True).load(str(tmp_path / "six.pth"))


def test_position_grid_is_resized_and_14px_patches_resampled_to_16(detector_cfg, tmp_path):
    # A ViT-H-like encoder: 14 px patches on a 2x2 grid; the model has 16 px patches and a 4x4 pretraining grid.
    encoder = vit_tiny_patch16(img_size=28, patch_size=14, depth=DEPTH).state_dict()
    model = instantiate(detector_cfg.model)
    report = load_encoder(model, read_checkpoint(_save_reference(tmp_path / "mae_pretrain_vit_h14.pth", encoder)))
    model_sd = model.state_dict()

    # ViTDet's p14to16: the kernel interpolated bicubically (a ViTDet author's snippet, long_seq_mae issue 2)
    torch.testing.assert_close(model_sd["backbone.net.patch_embed.proj.weight"],
                               F.interpolate(encoder["patch_embed.proj.weight"], size=(16, 16), mode="bicubic",
                                             align_corners=False), rtol=0, atol=0)
    pos = encoder["pos_embed"]  # (1, 1 + 2*2, 192): cls row first
    grid = pos[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model_sd["backbone.net.pos_embed"], torch.cat([pos[:, :1], resized], dim=1))
    assert "backbone.net.pos_embed" in report.loaded


def test_a_position_table_without_a_cls_row_gets_the_row_detectron2_keeps(detector_cfg, tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()  # the model's 4x4 grid
    encoder["pos_embed"] = encoder["pos_embed"][:, 1:]  # as a no-cls-token timm ViT stores it
    model = instantiate(detector_cfg.model)
    load_encoder(model, read_checkpoint(_save_reference(tmp_path / "no_cls_row.pth", encoder)))
    pos = model.state_dict()["backbone.net.pos_embed"]  # (1, 1 + 16, 192): the cls row is stored, never used
    assert torch.equal(pos[:, 1:], encoder["pos_embed"]) and not pos[:, 0].any()


def test_a_position_table_of_a_non_square_grid_is_refused_not_resized(detector_cfg, tmp_path):
    encoder = vit_tiny_patch16(img_size=(32, 48), depth=DEPTH).state_dict()  # 2 x 3 patches: no square to resize
    path = _save_reference(tmp_path / "crops.pth", encoder)
    with pytest.raises(CheckpointError, match=r"crops.pth: pos_embed \(1, 7, 192\) is not 0 or 1 prefix row"):
        load_encoder(instantiate(detector_cfg.model), read_checkpoint(path))


def test_checkpoint_of_another_width_is_refused_by_name(detector_cfg, tmp_path):
    encoder = vit_small_patch16(img_size=64, depth=DEPTH).state_dict()
    path = _save_reference(tmp_path / "mae_pretrain_vit_small.pth", encoder)
    model = instantiate(detector_cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        ViTDetCheckpointer(model).load(str(path))
    message = str(error.value)
    assert str(path) in message
    assert "ViT-small (384 wide, 2 blocks)" in message and "ViT-tiny (192 wide, 2 blocks)" in message
    assert "model.backbone.net" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_segmentation_backbone_s_own_parts_are_refused_by_name(detector_cfg, tmp_path):
    """Trained layer scale and relative position bias (train_seg.py's, mmseg's) have no place in detectron2's ViT:
    refused, naming them, rather than dropped from a backbone that was trained with them."""
    encoder = vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()
    for i in range(DEPTH):  # as tools/train_seg.py's backbone holds them (64 px: a 4 x 4 grid, 3 heads)
        encoder[f"blocks.{i}.ls1.gamma"] = torch.full((192,), 0.1)
        encoder[f"blocks.{i}.rel_pos_bias.table"] = torch.randn((2 * 4 - 1) ** 2 + 3, 3)
    path = _save_reference(tmp_path / "seg_backbone.pth", encoder)
    model = instantiate(detector_cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        ViTDetCheckpointer(model).load(str(path))
    assert f"{path} (mae, encoder) has tensors the model has no place for:" in str(error.value)
    assert "backbone.net.blocks.{0..1}.ls1.gamma" in str(error.value)
    assert "backbone.net.blocks.{0..1}.rel_pos_bias.table" in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_matching_heuristics_are_refused(detector_cfg, tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()
    path = _save_reference(tmp_path / "mae_pretrain_vit_tiny.pth", encoder)
    with pytest.raises(CheckpointError, match=r"exact names.*drop the '\?matching_heuristics=True'"):
        ViTDetCheckpointer(instantiate(detector_cfg.model)).load(f"{path}?matching_heuristics=True")


def test_a_huggingface_vitmae_directory_loads_as_an_encoder(detector_cfg, tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()
    source = read_checkpoint(_save_reference(tmp_path / "mae_pretrain_vit_tiny.pth", encoder))
    hf_dir = write(convert(source, "hf", encoder_only=True), tmp_path / "vit-mae-tiny")  # a ViTMAEModel folder
    model = instantiate(detector_cfg.model)
    assert ViTDetCheckpointer(model).load(str(hf_dir)) == {}
    model_sd = model.state_dict()
    for k in ("blocks.1.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "pos_embed"):
        assert torch.equal(model_sd["backbone.net." + k], encoder[k]), k


def test_a_missing_checkpoint_is_named_with_where_it_came_from(detector_cfg, tmp_path):
    model = instantiate(detector_cfg.model)
    with pytest.raises(FileNotFoundError) as error:
        ViTDetCheckpointer(model).load(str(tmp_path / "mae_pretrain_vit_tiny.pth"))
    assert str(error.value) == f"checkpoint not found: {tmp_path / 'mae_pretrain_vit_tiny.pth'} " \
                               "(given as train.init_checkpoint)"
    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")  # a run to resume, but not what is loaded here
    with pytest.raises(FileNotFoundError, match=r"missing\.pth \(given as train\.init_checkpoint\)$"):
        ViTDetCheckpointer(model, str(tmp_path)).load(str(tmp_path / "missing.pth"))

    (tmp_path / "last_checkpoint").write_text("model_0000099.pth")  # its checkpoint was deleted since
    with pytest.raises(FileNotFoundError) as error:
        ViTDetCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert str(error.value) == f"checkpoint not found: {tmp_path / 'model_0000099.pth'} (--resume's checkpoint, " \
                               f"named in {tmp_path / 'last_checkpoint'})"


def test_an_interrupted_tag_keeps_the_last_checkpoint_name(detector_cfg, tmp_path, monkeypatch):
    checkpointer = ViTDetCheckpointer(instantiate(detector_cfg.model), str(tmp_path))
    checkpointer.save("model_0000009")
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")

    def torn_write(self, text):
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError, match="No space left on device"):
        checkpointer.tag_last_checkpoint("model_0000019.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000009.pth"]


def test_a_detector_read_as_an_encoder_keeps_exactly_the_plain_vit(detector_cfg):
    # ViTDet's relative position tables (rel_pos_h and rel_pos_w), the pyramid and the heads have no canonical name
    detector = instantiate(detector_cfg.model).state_dict()
    assert any(k.endswith(".attn.rel_pos_w") for k in detector) and any(k.endswith(".attn.rel_pos_h") for k in detector)
    encoder = set(vit_tiny_patch16(img_size=64, depth=DEPTH).state_dict()) - set(ENCODER_ONLY)
    assert set(FORMATS["detectron2"].to_canonical(detector)) == encoder
