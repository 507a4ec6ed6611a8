"""A command given a wrong path, an unsafe checkpoint or a malformed dataset ends with one line naming it."""
import json
import sys

import pytest

from mae_transfer.checkpoints import CheckpointError
from mae_transfer.data.classification import DatasetFormatError
from mae_transfer.engine import exit_on_input_error
from pretrain_helpers import MAIN, ROOT, make_image_folder, one_thread, run_tool, tiny_flags

sys.path.insert(0, str(ROOT / "pretrain"))
import main_pretrain  # noqa: E402


@pytest.mark.parametrize("error", [CheckpointError("a.pth: refused"), DatasetFormatError("val.json: no 'images'"),
                                   FileNotFoundError("checkpoint not found: a.pth"),
                                   NotADirectoryError("a.png is a file, not an image folder")])
def test_input_errors_end_the_command_with_their_message(error):
    with pytest.raises(SystemExit) as exit_info, exit_on_input_error():
        raise error
    assert exit_info.value.code == f"error: {error}"  # printed to stderr by Python, exit status 1
    assert exit_info.value.__suppress_context__


def test_other_errors_keep_their_traceback():
    with pytest.raises(KeyError), exit_on_input_error():  # a bug, not an input: the traceback is what helps
        raise KeyError("blocks.0.attn.qkv.weight")


def test_each_script_reports_its_input_error_in_one_line(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images / "train" / "a", 2)
    make_image_folder(images / "val" / "a", 2)
    unsafe = tmp_path / "notes.pth"
    unsafe.write_text(json.dumps({"model": "not a checkpoint"}))
    commands = {
        "pretraining": ([str(MAIN), "--data_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "pt")],
                        f"error: image folder not found: {tmp_path / 'nowhere'}"),
        "classification": ([str(ROOT / "tools" / "train_cls.py"), "--model", "vit_tiny_patch16", "--data_path",
                            str(images), "--finetune", str(unsafe), "--output_dir", str(tmp_path / "cls"),
                            "--device", "cpu"], f"error: {unsafe}: refused to load"),
        "reconstructions": ([str(ROOT / "tools" / "visualize_mae.py"), "--checkpoint", str(tmp_path / "none.pth"),
                             "--images", str(images)], f"error: checkpoint not found: {tmp_path / 'none.pth'}"),
    }
    for name, (argv, message) in commands.items():
        result = run_tool([sys.executable, *argv], timeout=120)
        assert result.returncode == 1, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert result.stderr.strip().splitlines()[-1].startswith(message), (name, result.stderr[-2000:])


def test_batch_flags_that_contradict_are_blamed_on_the_flags_and_too_few_images_on_the_folder(tmp_path):
    make_image_folder(tmp_path / "images", 6)
    for flags, message in ((dict(effective_batch_size=6), "error: --effective_batch_size 6 is not a multiple of "
                                                          "batch_size x processes = 4 x 1"),
                           (dict(accum_iter=2, effective_batch_size=4), "error: --accum_iter 2 contradicts"),
                           (dict(batch_size=8), f"error: {tmp_path / 'images'}: 6 training images are too few")):
        with pytest.raises(SystemExit) as exit_info, one_thread(), exit_on_input_error():  # as the script runs main
            main_pretrain.main(main_pretrain.parse_args(tiny_flags(tmp_path / "images", tmp_path / "out", **flags)))
        assert str(exit_info.value.code).startswith(message)
