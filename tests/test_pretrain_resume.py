"""Interrupt-and-resume in fresh processes: a run stopped (by --max_steps, or by kill -9 at a random moment) and
resumed from its checkpoint ends with exactly the parameters of the uninterrupted run."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from mae_transfer.checkpoints import CheckpointError, read_checkpoint
from pretrain_helpers import (MAIN, ROOT, as_reference_checkpoint, make_image_folder, one_thread, run_main,
                              subprocess_env, tiny_flags)

sys.path.insert(0, str(ROOT / "pretrain"))
import main_pretrain  # noqa: E402


def _run_here(argv):
    with one_thread():  # as in the child processes
        main_pretrain.main(main_pretrain.parse_args(argv))


def _final_weights(out):
    return read_checkpoint(out / "mae_full.safetensors").state_dict


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    make_image_folder(tmp_path / "data", 8)
    common = dict(epochs=4, masking="block", norm_pix_loss=True, lr=1e-3)  # block masking draws many random numbers

    _run_here(tiny_flags(tmp_path / "data", tmp_path / "full", **common))

    # Stopped deterministically after 2 of 4 epochs (k = 4 of N = 8 steps), then resumed in a fresh process.
    _run_here(tiny_flags(tmp_path / "data", tmp_path / "split", max_steps=4, **common))
    resumed = run_main(tiny_flags(tmp_path / "data", tmp_path / "split", resume=tmp_path / "split", **common))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "checkpoint-1.pth" in resumed.stdout
    _assert_same(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "split"))

    # Killed with SIGKILL as soon as its first checkpoint exists (wherever it is then, even mid-save).
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(MAIN), *tiny_flags(tmp_path / "data", killed_out, **common)],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed_out / "checkpoint-0.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "mae_full.safetensors").exists(), "the run finished before it could be killed"
    resumed = run_main(tiny_flags(tmp_path / "data", killed_out, resume=killed_out, **common))
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(_final_weights(tmp_path / "full"), _final_weights(killed_out))


def test_a_resumption_keeps_the_recipe_and_a_fresh_run_keeps_off_an_earlier_one(tmp_path, capsys):
    make_image_folder(tmp_path / "data", 8)
    out = tmp_path / "run"
    common = dict(epochs=2, warmup_epochs=0, norm_pix_loss=True)
    _run_here(tiny_flags(tmp_path / "data", out, max_steps=2, **common))  # checkpoint-0.pth
    # Another decoder head count shapes no tensor: it would load and silently train another model.
    with pytest.raises(CheckpointError, match="saved by a run with decoder_num_heads=4; this run has "
                                              "decoder_num_heads=2"):
        _run_here(tiny_flags(tmp_path / "data", out, resume=out, decoder_num_heads=2, **common))
    with pytest.raises(CheckpointError, match="norm_pix_loss=True; this run has norm_pix_loss=False"):
        _run_here(tiny_flags(tmp_path / "data", out, resume=out, **{**common, "norm_pix_loss": None}))
    # Without --resume it would overwrite checkpoint-0 and leave the earlier run's later ones to a later --resume.
    with pytest.raises(CheckpointError, match="holds checkpoint-0.pth of an earlier run: add --resume"):
        _run_here(tiny_flags(tmp_path / "data", out, **common))
    capsys.readouterr()
    # The model's own default head count, now spelt out, is the same decoder; extending the run is fine, and said.
    _run_here(tiny_flags(tmp_path / "data", out, resume=out, decoder_num_heads=4, **{**common, "epochs": 3}))
    assert "settings changed since that run: epochs=3 (were epochs=2)" in capsys.readouterr().out
    _run_here(tiny_flags(tmp_path / "data", out, resume=out, **{**common, "epochs": 3}))
    assert "all 3 epochs were done: nothing to train" in capsys.readouterr().out


def test_a_run_of_the_reference_scripts_resumes_from_its_checkpoint(tmp_path, capsys):
    """Our runs draw each epoch's order, crops and masks from (--seed, epoch, image), so a checkpoint without
    generator states (the reference's) continues exactly as an uninterrupted run of ours; the decoder head count
    the reference fixed (16) is compared although its files do not record it."""
    make_image_folder(tmp_path / "data", 8)
    common = dict(epochs=3, norm_pix_loss=True, lr=1e-3, decoder_num_heads=16)
    _run_here(tiny_flags(tmp_path / "data", tmp_path / "full", **common))
    _run_here(tiny_flags(tmp_path / "data", tmp_path / "ours", max_steps=2, **common))  # checkpoint-0.pth
    split = tmp_path / "split"
    split.mkdir()
    as_reference_checkpoint(tmp_path / "ours" / "checkpoint-0.pth", split / "checkpoint-0.pth",
                            unrecorded=("masking", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"))
    with pytest.raises(CheckpointError, match="saved by a run with decoder_num_heads=16; this run has "
                                              "decoder_num_heads=4"):
        _run_here(tiny_flags(tmp_path / "data", split, resume=split, **{**common, "decoder_num_heads": None}))
    with pytest.raises(CheckpointError, match="saved by a run with masking=random; this run has masking=grid"):
        _run_here(tiny_flags(tmp_path / "data", split, resume=split, masking="grid", **common))
    capsys.readouterr()
    _run_here(tiny_flags(tmp_path / "data", split, resume=split, **common))
    assert "epoch 0 done, a training checkpoint of the MAE reference's scripts" in capsys.readouterr().out
    _assert_same(_final_weights(tmp_path / "full"), _final_weights(split))
