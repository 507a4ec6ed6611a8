"""Segmentor checkpoints load by exact names: mmseg's released UperNet-MAE checkpoints load into our configs' model and
compute what they compute in mmseg's own model; one trained for other classes starts training with new classifiers;
anything else that does not fit is refused by name, never evaluated or trained on half-loaded (mmengine's loading
would warn and go on)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

from mae_transfer.checkpoints import CheckpointError, read_checkpoint, read_file, save_checkpoint  # noqa: E402
from mae_transfer.data.synthetic import generate_world  # noqa: E402
from mae_transfer.models import vit_tiny_patch16  # noqa: E402
from mae_transfer.seg import load_segmentor  # noqa: E402
from mae_transfer.seg.load import segmentor_state_dict  # noqa: E402
from convert_helpers import load_tool  # noqa: E402
from pretrain_helpers import run_tool  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "seg_configs" / "upernet_mae_vit_tiny_synthetic_64x64.py"
# mmseg's own MAE backbone (as in its configs/_base_/models/upernet_mae.py) at the tiny config's size
MMSEG_MAE = dict(type="MAE", img_size=(64, 64), patch_size=16, embed_dims=192, num_layers=12, num_heads=3, mlp_ratio=4,
                 out_indices=(3, 5, 7, 11), drop_path_rate=0.0, norm_cfg=dict(type="LN", eps=1e-6), init_values=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=0, size="tiny")
    return root / "ade"


def _load(model, path):
    return load_segmentor(model, read_file(path)[0], str(path))


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
    report = _load(ours, path)
    assert report.new == [] and report.dropped == []
    assert len(report.loaded) == len(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, mode="tensor"), theirs(x, mode="tensor"), rtol=1e-4, atol=1e-4)


def test_mmseg_s_own_vit_b_upernet_maps_one_to_one_onto_our_vit_b_config():
    # The released ViT-B checkpoint is mmseg's model of its MAE config: built here, its state dict translated fits our
    # ViT-B config's model tensor for tensor, in name and shape (no weights downloaded, no forward at 512 px).
    import mmseg
    theirs = Config.fromfile(str(Path(mmseg.__file__).parent / ".mim" / "configs" / "mae" /
                                 "mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"))
    ours = Config.fromfile(str(REPO / "seg_configs" / "upernet_mae_vit_base_ade20k_512x512_160k.py"))
    init_default_scope("mmseg")
    released = segmentor_state_dict(MODELS.build(theirs.model).state_dict(), "mmseg's ViT-B UperNet")
    model = MODELS.build(ours.model).state_dict()
    assert released.keys() == model.keys()
    assert all(released[k].shape == model[k].shape for k in model)


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_tensors(tmp_path):
    state = _segmentor().state_dict()
    missing = dict(state)
    del missing["auxiliary_head.conv_seg.bias"]
    torch.save({"state_dict": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth lacks tensors the model needs:\s+auxiliary_head"):
        _load(_segmentor(), tmp_path / "missing.pth")
    other_classes = dict(state, **{"decode_head.conv_seg.weight": torch.zeros(150, 64, 1, 1)})
    torch.save({"state_dict": other_classes}, tmp_path / "ade20k_150.pth")
    with pytest.raises(CheckpointError, match=r"decode_head\.conv_seg\.weight: .*\(150, 64, 1, 1\) vs model \(6, 64"):
        _load(_segmentor(), tmp_path / "ade20k_150.pth")
    torch.save({"state_dict": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a segmentor checkpoint"):
        _load(_segmentor(), tmp_path / "empty.pth")


def test_an_encoder_given_for_a_segmentor_is_refused_pointing_to_model_pretrained(tmp_path):
    """An encoder (pretraining's encoder.safetensors, the reference's mae_pretrain_*.pth) as load_from or
    test_seg.py's checkpoint: named as what it is, not as a segmentor lacking its own tensors."""
    encoder = vit_tiny_patch16(img_size=64).state_dict()
    ours = save_checkpoint(tmp_path / "encoder.safetensors", encoder, {"model": "mae_vit_tiny_patch16"})
    reference = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder}, reference)
    for path in (ours, reference):
        with pytest.raises(CheckpointError, match=rf"{path} holds a ViT encoder, not a segmentor \(no "
                                                  rf"decode_head\): to start a segmentor from it, train with "
                                                  rf"model\.pretrained={path}"):
            _load(_segmentor(), path)


def test_test_seg_refuses_it_before_evaluating(world, tmp_path):
    state = _segmentor().state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("neck.")}}, tmp_path / "bad.pth")
    refused = run_tool([sys.executable, str(REPO / "tools" / "test_seg.py"), str(CONFIG), str(tmp_path / "bad.pth"),
                        "--work-dir", str(tmp_path / "work"), "--data-root", str(world), "--cfg-options",
                        "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False"])
    assert refused.returncode != 0
    assert re.search(r"CheckpointError: .*bad\.pth lacks tensors the model needs:\s+neck\.", refused.stderr), \
        refused.stderr[-3000:]
    assert not (tmp_path / "work" / "metrics.json").exists()


def test_test_seg_takes_a_checkpoint_url_to_mmengine_s_loaders(world, tmp_path, monkeypatch):
    """As mmseg's tools/test.py: a URL is no local file, and mmengine's CheckpointLoader (here a stand-in, no network)
    fetches it."""
    from mmengine.runner import CheckpointLoader
    url = "https://download.openmmlab.com/mmsegmentation/v0.5/mae/upernet_mae-tiny.pth"
    fetched = []

    def fetch(filename, map_location=None, logger="current"):
        fetched.append(filename)
        return {"state_dict": _segmentor().state_dict()}

    monkeypatch.setattr(CheckpointLoader, "load_checkpoint", fetch)
    # In this process (for the stand-in), under a visualizer of its own: mmengine keeps one per name per process,
    # and another test's run in the same process would write through this one's folders.
    report = load_tool("test_seg").main([str(CONFIG), url, "--work-dir", str(tmp_path / "work"), "--data-root",
                                         str(world), "--cfg-options", "test_dataloader.num_workers=0",
                                         "test_dataloader.persistent_workers=False", "visualizer.name=url_test"])
    assert fetched == [url]
    assert report["checkpoint"] == url and json.loads((tmp_path / "work" / "metrics.json").read_text()) == report


def test_training_from_a_segmentor_of_other_classes_takes_all_but_its_classifiers(world, tmp_path):
    ade = _segmentor()  # stands in for an ADE20K model: 150 classes, every tensor away from its initial value
    with torch.no_grad():
        for p in ade.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: (torch.randn(150, *v.shape[1:]) if ".conv_seg." in k else v) for k, v in ade.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ade20k.pth")
    options = ["train_cfg.max_iters=1", "train_cfg.val_interval=10", "default_hooks.checkpoint.interval=1",
               "optim_wrapper.optimizer.lr=0", "train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
               "train_dataloader.persistent_workers=False", "val_dataloader.num_workers=0",
               "val_dataloader.persistent_workers=False"]

    def train(checkpoint, work_dir, *flags):  # a process of its own: mmengine's visualizer is process-wide
        return run_tool([sys.executable, str(REPO / "tools" / "train_seg.py"), str(CONFIG), "--work-dir",
                         str(work_dir), "--data-root", str(world), *flags, "--cfg-options", *options,
                         f"load_from={checkpoint}"])

    done = train(tmp_path / "ade20k.pth", tmp_path / "work")
    assert done.returncode == 0, done.stderr[-3000:]
    trained = torch.load(tmp_path / "work" / "iter_1.pth", weights_only=True)["state_dict"]
    assert trained.keys() == state.keys()
    for k, v in state.items():  # lr 0: what was loaded is what was saved (batch-norm statistics aside)
        if ".conv_seg." in k:
            assert trained[k].shape[0] == 6, k  # the tiny config's classes, initialised afresh
        elif not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(trained[k], v), k
    assert "was trained for another number of classes" in done.stdout + done.stderr

    # --resume with a load_from resumes from it, as in mmengine: a file of weights alone is refused, saying why
    resumed = train(tmp_path / "ade20k.pth", tmp_path / "work3", "--resume")
    assert resumed.returncode != 0
    assert re.search(r"CheckpointError: .*ade20k\.pth: --resume continues a run .* holds no training state",
                     resumed.stderr), resumed.stderr[-3000:]

    del state["neck.upsample_4x.0.weight"]  # anything else that does not fit is refused
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    refused = train(tmp_path / "broken.pth", tmp_path / "work2")
    assert refused.returncode != 0
    assert re.search(r"CheckpointError: .*broken\.pth lacks tensors the model needs:\s+neck\.upsample_4x",
                     refused.stderr), refused.stderr[-3000:]


def test_our_segmentor_checkpoint_is_an_encoder_to_inspect_and_to_model_pretrained(tmp_path, capsys):
    """tools/train_seg.py's iter_N.pth: the format registry reads its encoder (under 'backbone.vit.', relative
    position tables and layer scale included) and sets the neck and heads aside."""
    trained = _segmentor()
    with torch.no_grad():  # nothing left at a constant init: relative position tables, layer scale, norms
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = trained.state_dict()
    path = tmp_path / "iter_40.pth"
    torch.save({"meta": {"iter": 40}, "state_dict": state}, path)  # as mmengine's Runner saves it
    encoder = {k[len("backbone.vit."):]: v for k, v in state.items() if k.startswith("backbone.vit.")}
    assert any(k.endswith("rel_pos_bias.table") for k in encoder) and any(k.endswith("ls1.gamma") for k in encoder)

    assert load_tool("inspect_checkpoint").main([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["kind"]) == ("mae_transfer_seg", "encoder")
    encoder_size = sum(v.numel() for v in encoder.values())
    assert info["parameters"] == {"encoder": encoder_size, "total": encoder_size}
    assert info["set_aside_parameters"] == sum(v.numel() for v in state.values()) - encoder_size

    cfg = Config.fromfile(str(CONFIG))
    cfg.model.pretrained = str(path)
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    model.init_weights()
    loaded = model.backbone.vit.state_dict()
    assert loaded.keys() == encoder.keys()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items())

    # Its trained relative position bias and layer scale have a place in mmseg's layout only.
    convert = load_tool("convert_checkpoint")
    parts = "blocks.{0..11}.ls1.gamma, blocks.{0..11}.ls2.gamma, blocks.{0..11}.rel_pos_bias.table"
    for to in ("timm", "mae", "hf", "detectron2"):
        assert convert.main([str(path), str(tmp_path / f"seg_{to}{'.pth' if to != 'hf' else ''}"), "--to", to]) == 1
        assert f"holds a segmentation backbone's own parts ({parts}), which the {to} layout" in capsys.readouterr().err
    assert convert.main([str(path), str(tmp_path / "seg_mmseg.pth"), "--to", "mmseg"]) == 0
    assert all(torch.equal(v, read_checkpoint(tmp_path / "seg_mmseg.pth").state_dict[k]) for k, v in encoder.items())
