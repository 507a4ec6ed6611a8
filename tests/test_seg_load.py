"""Evaluating a trained segmentor: mmseg's released UperNet-MAE checkpoints load into our configs' model and compute
what they compute in mmseg's own model; a checkpoint that does not fit is refused by name, never evaluated half-loaded
(mmengine's load_from would warn and go on)."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

from mae_transfer.checkpoints import CheckpointError  # noqa: E402
from mae_transfer.seg import load_segmentor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "seg_configs" / "upernet_mae_vit_tiny_synthetic_64x64.py"
# mmseg's own MAE backbone (as in its configs/_base_/models/upernet_mae.py) at the tiny config's size
MMSEG_MAE = dict(type="MAE", img_size=(64, 64), patch_size=16, embed_dims=192, num_layers=12, num_heads=3, mlp_ratio=4,
                 out_indices=(3, 5, 7, 11), drop_path_rate=0.0, norm_cfg=dict(type="LN", eps=1e-6), init_values=1.0)


def _segmentor(backbone=None):
    cfg = Config.fromfile(str(CONFIG))
    init_default_scope("mmseg")
    if backbone is not None:
        cfg.model.backbone = backbone
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


def test_an_mmseg_released_segmentor_computes_in_our_model_what_it_computes_in_mmseg_s(tmp_path):
    theirs = _segmentor(MMSEG_MAE)
    theirs.init_weights()
    with torch.no_grad():  # nothing left at a constant init: relative position tables, layer scale, norms
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "upernet_mae-tiny_ade20k.pth"  # as mmseg's model zoo ships one (mmcv 1.x's layout)
    torch.save({"meta": {"CLASSES": ("a", "b"), "mmcv_version": "1.4.8"}, "state_dict": theirs.state_dict()}, path)

    ours = _segmentor()
    report = load_segmentor(ours, path)
    assert report.new == [] and report.dropped == []
    assert len(report.loaded) == len(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mode="tensor"), theirs(x, mode="tensor"), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensors(tmp_path):
    state = _segmentor().state_dict()
    missing = dict(state)
    del missing["auxiliary_head.conv_seg.bias"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth lacks tensors the model needs:\s+auxiliary_head"):
        load_segmentor(_segmentor(), tmp_path / "missing.pth")
    other_classes = dict(state, **{"decode_head.conv_seg.weight": torch.zeros(150, 64, 1, 1)})
    torch.save({"state_dict": other_classes}, tmp_path / "ade20k_150.pth")
    with pytest.raises(CheckpointError, match=r"decode_head\.conv_seg\.weight: .*\(150, 64, 1, 1\) vs model \(6, 64"):
        load_segmentor(_segmentor(), tmp_path / "ade20k_150.pth")
    torch.save({"state_dict": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a segmentor checkpoint"):
        load_segmentor(_segmentor(), tmp_path / "empty.pth")


def test_test_seg_refuses_it_before_evaluating(tmp_path):
    state = _segmentor().state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("neck.")}}, tmp_path / "bad.pth")
    spec = importlib.util.spec_from_file_location("test_seg", REPO / "tools" / "test_seg.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "data").mkdir()
    with pytest.raises(CheckpointError, match="lacks tensors the model needs"):
        tool.main([str(CONFIG), str(tmp_path / "bad.pth"), "--work-dir", str(tmp_path / "work"),
                   "--data-root", str(tmp_path / "data")])
    assert not (tmp_path / "work" / "metrics.json").exists()
