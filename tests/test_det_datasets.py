"""COCO-format datasets by paths: what a user sees when a path or an image is wrong, or the class count is."""
import json
import os
import shutil
from pathlib import Path

import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser

from convert_helpers import load_tool
from mae_transfer.data.synthetic import CATEGORIES, generate_world
from mae_transfer.det import ViTDetCheckpointer, coco_instances

CONFIG = Path(__file__).resolve().parents[1] / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"
train_det = load_tool("train_det")


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det_world") / "world"
    generate_world(root, seed=0, size="tiny")
    return root / "coco"


def train_on(out, json_file, image_root, *overrides):
    """tools/train_det.py's main, training on the given files: the errors come before the first iteration."""
    args = default_argument_parser().parse_args([
        "--config-file", str(CONFIG), f"dataloader.train.dataset.json_file={json_file}",
        f"dataloader.train.dataset.image_root={image_root}", "dataloader.train.num_workers=0", "train.device=cpu",
        f"train.output_dir={out}", "train.max_iter=1", *overrides])
    return train_det.main(args)


def test_missing_annotation_file_is_named(coco, tmp_path):
    missing = tmp_path / "annotations" / "instances_train.json"
    with pytest.raises(FileNotFoundError) as error:
        train_on(tmp_path, missing, coco / "train")
    message = str(error.value)
    assert "annotation file not found" in message and str(missing) in message
    assert "dataloader.{train,test}.dataset.json_file=" in message


def test_missing_image_folder_is_named(coco, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image folder not found: {tmp_path / 'images'}"):
        train_on(tmp_path, coco / "annotations" / "instances_train.json", tmp_path / "images")


def test_image_referenced_but_absent_is_named(coco, tmp_path):
    images = tmp_path / "train"
    shutil.copytree(coco / "train", images)
    absent = sorted(images.iterdir())[3]
    absent.unlink()
    json_file = coco / "annotations" / "instances_train.json"
    with pytest.raises(FileNotFoundError) as error:
        train_on(tmp_path, json_file, images)
    message = str(error.value)
    assert f"1 of the 8 images that {json_file} references are missing under {images}" in message
    assert str(absent) in message


def test_class_count_other_than_the_datasets_is_refused(coco, tmp_path):
    with pytest.raises(ValueError, match=rf"has {len(CATEGORIES)} categories but model.roi_heads.num_classes is 3"):
        train_on(tmp_path, coco / "annotations" / "instances_train.json", coco / "train",
                 "model.roi_heads.num_classes=3")


def test_a_test_set_of_other_categories_is_refused_before_training_or_inference(coco, tmp_path, monkeypatch):
    """The model is built for the training set's categories; a test set with one fewer is refused before anything
    runs, in training and with --eval-only (detectron2's COCOEvaluator would assert after the whole inference)."""
    val = json.loads((coco / "annotations" / "instances_val.json").read_text())
    dropped = val["categories"].pop()["id"]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dropped]
    (tmp_path / "instances_val5.json").write_text(json.dumps(val))
    test_set = [f"dataloader.test.dataset.json_file={tmp_path / 'instances_val5.json'}",
                f"dataloader.test.dataset.image_root={coco / 'val'}", "dataloader.test.num_workers=0"]

    def inference(*args):
        raise AssertionError("inference ran")

    monkeypatch.setattr("mae_transfer.det.evaluation.inference_on_dataset", inference)
    refused = rf"test dataset 'synthetic_coco_val' has {len(CATEGORIES) - 1} categories but " \
              rf"model.roi_heads.num_classes is {len(CATEGORIES)}: evaluate on a dataset of the model's"
    with pytest.raises(ValueError, match=refused):
        train_on(tmp_path / "run", coco / "annotations" / "instances_train.json", coco / "train", *test_set)
    assert not (tmp_path / "run" / "last_checkpoint").exists()  # refused before training

    ViTDetCheckpointer(instantiate(LazyConfig.load(str(CONFIG)).model), str(tmp_path)).save("detector")
    args = default_argument_parser().parse_args([
        "--config-file", str(CONFIG), "--eval-only", *test_set, "train.device=cpu",
        f"train.init_checkpoint={tmp_path / 'detector.pth'}", f"train.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ValueError, match=refused):
        train_det.main(args)


def test_coco_configs_read_coco_where_detectron2_s_builtin_datasets_do(monkeypatch, tmp_path):
    """datasets/coco, or $DETECTRON2_DATASETS/coco: the files detectron2 registers coco_2017_{train,val} with."""
    from detectron2.data import MetadataCatalog  # importing detectron2.data registers the builtin datasets
    registered_under = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))  # as detectron2 read it
    builtin = {split: [os.path.relpath(path, registered_under) for path in (meta.json_file, meta.image_root)]
               for split, meta in (("train", MetadataCatalog.get("coco_2017_train")),
                                   ("test", MetadataCatalog.get("coco_2017_val")))}
    for root in ("datasets", str(tmp_path / "d2")):
        if root == "datasets":
            monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
        else:
            monkeypatch.setenv("DETECTRON2_DATASETS", root)
        loader = LazyConfig.load(str(CONFIG.parent / "mask_rcnn_vit_base_100ep.py")).dataloader
        for split, files in builtin.items():
            dataset = loader[split].dataset
            assert [dataset.json_file, dataset.image_root] == [os.path.join(root, f) for f in files], (root, split)


def test_any_coco_format_dataset_loads_by_paths(coco):
    dicts = coco_instances("my_dataset", coco / "annotations" / "instances_val.json", coco / "val",
                           filter_empty=False)
    assert len(dicts) == 4 and all(Path(d["file_name"]).parent == coco / "val" for d in dicts)
    assert all(0 <= a["category_id"] < len(CATEGORIES) for d in dicts for a in d["annotations"])
