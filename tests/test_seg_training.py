"""The tiny segmentation config end to end on the synthetic ADE20K-layout world: training lowers the loss, the
tools evaluate and resume, the metric is right on a perfect prediction, and broken datasets fail clearly."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import DATASETS, METRICS  # noqa: E402

import mae_transfer.seg  # noqa: E402,F401  (registers the dataset and metric)
from mae_transfer.data.synthetic import CATEGORIES, generate_world  # noqa: E402
from pretrain_helpers import one_thread  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "seg_configs" / "upernet_mae_vit_tiny_synthetic_64x64.py"
ITERS = 40
TRAIN = [f"train_cfg.max_iters={ITERS}", f"train_cfg.val_interval={ITERS}", "default_hooks.logger.interval=1",
         f"default_hooks.checkpoint.interval={ITERS}", "train_dataloader.batch_size=4",
         "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
         "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False", "test_dataloader.num_workers=0",
         "test_dataloader.persistent_workers=False", "optim_wrapper.optimizer.lr=0.003", "param_scheduler.0.end=5",
         "param_scheduler.1.begin=5", f"param_scheduler.1.end={ITERS}"]


def _tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "world"
    generate_world(root, seed=0, size="tiny")
    return root / "ade"


def _val_dataset(data_root):
    cfg = Config.fromfile(str(CONFIG))
    init_default_scope("mmseg")
    dataset_cfg = cfg.val_dataloader.dataset
    dataset_cfg.data_root = str(data_root)
    return DATASETS.build(dataset_cfg)


def test_config_classes_are_the_synthetic_categories():
    assert tuple(Config.fromfile(str(CONFIG)).classes) == CATEGORIES


def test_tiny_training_lowers_the_loss_then_evaluates_and_resumes(world, tmp_path, single_thread):
    work_dir = tmp_path / "work"
    options = TRAIN
    _tool("train_seg").main([str(CONFIG), "--work-dir", str(work_dir), "--data-root", str(world),
                             "--cfg-options", *options])

    logs = [json.loads(line) for line in next(work_dir.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(losses) == ITERS
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses
    validation = [entry for entry in logs if "mIoU" in entry]
    assert len(validation) == 1 and 0.0 <= validation[0]["mIoU"] <= 100.0
    checkpoint = work_dir / f"iter_{ITERS}.pth"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []  # weights-only loadable

    # tools/test_seg.py loads it (mmengine's own loader, weights only) and writes the metrics file
    report = _tool("test_seg").main([str(CONFIG), str(checkpoint), "--work-dir", str(tmp_path / "test"),
                                     "--data-root", str(world), "--cfg-options", *options])
    written = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert written == report
    assert report["mIoU"] == pytest.approx(validation[0]["mIoU"], abs=1e-6)
    assert set(report["per_class"]) == set(CATEGORIES)
    assert all(set(v) == {"IoU", "Acc"} for v in report["per_class"].values())

    # --resume continues from the last iteration (optimizer, schedule and message hub restored)
    def scalars():  # in one process mmengine's visualizer lives on, so the second run appends to the first's file
        return [json.loads(line) for path in sorted(work_dir.glob("*/vis_data/scalars.json"))
                for line in path.read_text().splitlines()]
    first_run = len(scalars())
    _tool("train_seg").main([str(CONFIG), "--work-dir", str(work_dir), "--data-root", str(world), "--resume",
                             "--cfg-options", *options, f"train_cfg.max_iters={ITERS + 2}",
                             f"param_scheduler.1.end={ITERS + 2}", "train_cfg.val_interval=100"])
    resumed = scalars()[first_run:]
    assert [entry["iter"] for entry in resumed if "loss" in entry] == [ITERS + 1, ITERS + 2]
    state = torch.load(work_dir / f"iter_{ITERS + 2}.pth", weights_only=True)
    assert state["meta"]["iter"] == ITERS + 2
    # AdamW's step counts went on from the restored optimizer state: a fresh optimizer would be at 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {ITERS + 2}


def test_whole_image_inference_at_a_size_off_the_patch_grid_stays_aligned():
    """A 72x100 image (not a multiple of 16): the segmentor's prediction is the model run on the image padded to 80x112
    (zeros after normalisation), cut back to 72x100 - not the padded grid's logits stretched over the image."""
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    cfg = Config.fromfile(str(CONFIG))
    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    image = torch.randint(0, 256, (3, 72, 100), dtype=torch.uint8)  # BGR, as mmseg's loader gives it
    sample = SegDataSample(metainfo=dict(img_shape=(72, 100), ori_shape=(72, 100)))
    with torch.no_grad():
        got = model.test_step(dict(inputs=[image], data_samples=[sample]))[0].seg_logits.data
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (cfg.model.data_preprocessor.mean,
                                                             cfg.model.data_preprocessor.std))
        padded = torch.zeros(1, 3, 80, 112)
        padded[0, :, :72, :100] = (image.flip(0).float() - mean) / std  # to RGB, normalised
        expected = model.encode_decode(padded, [dict(img_shape=(80, 112), pad_shape=(80, 112))])[0, :, :72, :100]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ground_truth_as_prediction_gives_miou_100(world):
    dataset = _val_dataset(world)
    metric = METRICS.build(dict(type="PerClassIoUMetric", iou_metrics=["mIoU"]))
    metric.dataset_meta = dataset.metainfo
    for i in range(len(dataset)):
        sample = dataset[i]["data_samples"]
        metric.process({}, [dict(pred_sem_seg=dict(data=sample.gt_sem_seg.data),
                                 gt_sem_seg=dict(data=sample.gt_sem_seg.data))])
    metrics = metric.evaluate(len(dataset))
    assert metrics["mIoU"] == metrics["aAcc"] == metrics["mAcc"] == 100.0
    present = [name for name in CATEGORIES if not np.isnan(metrics[f"IoU.{name}"])]
    assert present and all(metrics[f"IoU.{name}"] == 100.0 for name in present)


def test_per_class_iou_and_accuracy_by_hand():
    """A 2x4 map of three classes (255 ignored): per class, IoU = |pred & gt| / |pred | gt| and Acc = |pred & gt| /
    |gt| over the labelled pixels, each reported under its own class name."""
    metric = METRICS.build(dict(type="PerClassIoUMetric", iou_metrics=["mIoU"]))
    metric.dataset_meta = dict(classes=("sky", "road", "car"))
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    metric.process({}, [dict(pred_sem_seg=dict(data=pred[None]), gt_sem_seg=dict(data=gt[None]))])
    metrics = metric.evaluate(1)
    # sky: pred {0, 6}, gt {0, 1} -> 1 / 3, 1 / 2; road: pred {1, 2, 3}, gt {2, 3} -> 2 / 3, 2 / 2;
    # car: pred {4, 5}, gt {4, 5, 6} -> 2 / 3, 2 / 3 (pixel 7 is ignored in both).
    expected_iou = {"sky": 100 / 3, "road": 200 / 3, "car": 200 / 3}
    expected_acc = {"sky": 50.0, "road": 100.0, "car": 200 / 3}
    for name in expected_iou:
        assert metrics[f"IoU.{name}"] == pytest.approx(expected_iou[name], abs=0.005), name
        assert metrics[f"Acc.{name}"] == pytest.approx(expected_acc[name], abs=0.005), name
    assert metrics["mIoU"] == pytest.approx(sum(expected_iou.values()) / 3, abs=0.005)
    assert metrics["aAcc"] == pytest.approx(100 * 5 / 7, abs=0.005)


def test_amp_without_a_gpu_is_refused_by_name(world, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="--amp needs a CUDA GPU"):
        _tool("train_seg").main([str(CONFIG), "--work-dir", str(tmp_path / "work"), "--data-root", str(world),
                                 "--amp"])
    assert not (tmp_path / "work").exists()  # refused before anything was written


def test_heads_of_another_class_count_than_the_dataset_s_are_refused_before_training_and_testing(world, tmp_path):
    """The synthetic world has 6 classes: a decode head of 10 (which would train silently) and an auxiliary head of 3
    (which would fail inside the loss) are refused by their config keys before any iteration or inference."""
    heads = {"model.decode_head.num_classes": 10, "model.auxiliary_head.num_classes": 3}
    options = [*TRAIN, *(f"{key}={n}" for key, n in heads.items())]
    refused = (r"dataset \(ADE20KLayoutDataset\) has 6 classes \(its metainfo 'classes'\) but "
               r"model\.decode_head\.num_classes is 10, model\.auxiliary_head\.num_classes is 3: set "
               r"model\.decode_head\.num_classes=6 model\.auxiliary_head\.num_classes=6")
    with pytest.raises(ValueError, match="train_dataloader." + refused):
        _tool("train_seg").main([str(CONFIG), "--work-dir", str(tmp_path / "train"), "--data-root", str(world),
                                 "--cfg-options", *options])
    assert not list((tmp_path / "train").glob("iter_*.pth"))

    from mmseg.registry import MODELS
    cfg = Config.fromfile(str(CONFIG))
    cfg.merge_from_dict(heads)
    init_default_scope("mmseg")
    torch.save({"state_dict": MODELS.build(cfg.model).state_dict()}, tmp_path / "mismatched.pth")
    with pytest.raises(ValueError, match="test_dataloader." + refused):
        _tool("test_seg").main([str(CONFIG), str(tmp_path / "mismatched.pth"), "--work-dir", str(tmp_path / "test"),
                                "--data-root", str(world), "--cfg-options", *options])
    assert not (tmp_path / "test" / "metrics.json").exists()


def test_missing_annotation_is_a_clear_error(world, tmp_path):
    broken = tmp_path / "ade"
    shutil.copytree(world, broken)
    (broken / "annotations" / "validation" / "000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images have no annotation.*000001\.jpg"):
        _val_dataset(broken)


def test_label_map_of_the_wrong_size_is_a_clear_error(world, tmp_path):
    broken = tmp_path / "ade"
    shutil.copytree(world, broken)
    label = broken / "annotations" / "validation" / "000002.png"
    Image.open(label).resize((32, 48), Image.NEAREST).save(label)
    dataset = _val_dataset(broken)
    dataset[0]
    with pytest.raises(ValueError, match=r"000002\.png is 32x48 \(WxH\) but its image .*000002\.jpg is 64x64"):
        dataset[2]


@pytest.mark.parametrize("orientation", [3, 5, 6, 7, 8])
def test_a_label_map_not_turned_like_its_exif_rotated_image_is_a_clear_error(world, tmp_path, orientation):
    import mmcv
    broken = tmp_path / "ade"
    shutil.copytree(world, broken)
    image, label = broken / "images" / "validation" / "000003.jpg", broken / "annotations" / "validation" / "000003.png"
    exif = Image.Exif()
    exif[0x0112] = orientation  # stored 64x48; 5-8 are shown turned by 90 degrees (and mirrored), 3 by 180
    Image.open(image).resize((64, 48)).save(image, exif=exif)
    Image.open(label).resize((64, 48), Image.NEAREST).save(label)  # labels the stored pixels
    turned = orientation != 3
    # mmseg's loader (OpenCV) decodes it turned: 48 wide, for 5-8
    assert mmcv.imread(str(image)).shape[:2] == ((64, 48) if turned else (48, 64))
    if not turned:
        _val_dataset(broken)[3]  # the same width and height: nothing to refuse
        return
    with pytest.raises(ValueError, match=r"000003\.png is 64x48 \(WxH\) but its image .*000003\.jpg is 48x64 once "
                                         r"turned by its EXIF orientation"):
        _val_dataset(broken)[3]


def test_vit_b_and_l_configs_name_the_released_encoder_as_mmseg_does():
    """model.pretrained, as in mmseg's MAE configs: mmseg's EncoderDecoder hands it to our backbone's init_cfg, and
    --cfg-options model.pretrained=PATH replaces it."""
    from mmseg.registry import MODELS
    init_default_scope("mmseg")
    large = Config.fromfile(str(REPO / "seg_configs" / "upernet_mae_vit_large_ade20k_512x512_160k.py"))
    assert large.model.pretrained == "pretrain/mae_pretrain_vit_large.pth"
    for options, expected in [({}, "pretrain/mae_pretrain_vit_base.pth"),
                              ({"model.pretrained": "runs/mine/encoder.safetensors"}, "runs/mine/encoder.safetensors")]:
        base = Config.fromfile(str(REPO / "seg_configs" / "upernet_mae_vit_base_ade20k_512x512_160k.py"))
        base.merge_from_dict(options)
        assert MODELS.build(base.model).backbone.init_cfg == {"type": "Pretrained", "checkpoint": expected}


def test_metrics_report_puts_each_metric_under_its_own_name():
    from mae_transfer.seg.runner import metrics_report
    flat = {"aAcc": 90.0, "mIoU": 50.0, "mAcc": 60.0, "IoU.sky": 40.0, "Acc.sky": 70.0,
            "IoU.road": float("nan"), "Acc.road": float("nan")}  # road: in neither ground truth nor prediction
    assert metrics_report(flat, ["sky", "road", "car"]) == {
        "aAcc": 90.0, "mIoU": 50.0, "mAcc": 60.0,
        "per_class": {"sky": {"IoU": 40.0, "Acc": 70.0}, "road": {"IoU": None, "Acc": None},
                      "car": {"IoU": None, "Acc": None}}}


def test_load_config_work_dir_and_data_root_as_mmseg_s_tools(tmp_path):
    from mae_transfer.seg.runner import load_config
    # mmseg's convention: --work-dir, else the config's work_dir (here set through --cfg-options), else
    # work_dirs/<config file name without .py>
    assert load_config(str(CONFIG)).work_dir == "work_dirs/upernet_mae_vit_tiny_synthetic_64x64"
    assert load_config(str(CONFIG), cfg_options={"work_dir": str(tmp_path / "cfg")}).work_dir == str(tmp_path / "cfg")
    assert load_config(str(CONFIG), cfg_options={"work_dir": str(tmp_path / "cfg")},
                       work_dir=str(tmp_path / "flag")).work_dir == str(tmp_path / "flag")
    cfg = load_config(str(CONFIG), data_root=str(tmp_path))
    assert [cfg[name].dataset.data_root for name in ("train_dataloader", "val_dataloader", "test_dataloader")] == \
        [str(tmp_path)] * 3
    with pytest.raises(FileNotFoundError, match=r"--data-root .*nowhere: no such directory"):
        load_config(str(CONFIG), data_root=str(tmp_path / "nowhere"))


def test_the_class_count_check_covers_the_validation_set_when_there_is_one():
    from types import SimpleNamespace
    from mmseg.registry import MODELS
    from mae_transfer.seg.runner import ClassCountCheckHook
    init_default_scope("mmseg")
    model = MODELS.build(Config.fromfile(str(CONFIG)).model)  # heads of the synthetic world's 6 classes

    def loader(classes):
        return SimpleNamespace(dataset=SimpleNamespace(metainfo={"classes": classes}))

    train = loader(CATEGORIES)
    with pytest.raises(ValueError, match=r"val_dataloader\.dataset \(SimpleNamespace\) has 3 classes .* "
                                         r"model\.decode_head\.num_classes is 6"):
        ClassCountCheckHook().before_train(SimpleNamespace(model=model, train_dataloader=train, val_loop=object(),
                                                           val_dataloader=loader(CATEGORIES[:3])))
    # Without a validation loop (train_cfg without val_interval) there is no validation set to check.
    ClassCountCheckHook().before_train(SimpleNamespace(model=model, train_dataloader=train, val_loop=None,
                                                       val_dataloader=None))
