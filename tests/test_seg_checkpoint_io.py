"""Segmentation checkpoints are written atomically: mmengine's save_checkpoint and the CheckpointHook's
last_checkpoint go through the file backend that importing mae_transfer.seg registers for local paths."""
import pytest
import torch
from mmengine.fileio import LocalBackend, get_file_backend
from mmengine.runner.checkpoint import save_checkpoint

import mae_transfer.seg  # noqa: F401  (registers the backend, as a config's custom_imports does)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_save_round_trips_and_an_interrupted_one_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "iter_2.pth"
    save_checkpoint({"meta": {"iter": 2}, "state_dict": {"w": torch.arange(3.0)}}, str(path))
    saved = torch.load(path, weights_only=True)
    assert saved["meta"] == {"iter": 2} and torch.equal(saved["state_dict"]["w"], torch.tensor([0.0, 1.0, 2.0]))
    before = path.read_bytes()

    def torn_put(self, obj, filepath):  # LocalBackend's own write, cut off halfway
        with open(filepath, "wb") as f:
            f.write(obj[: len(obj) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(LocalBackend, "put", torn_put)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint({"meta": {"iter": 4}, "state_dict": {"w": torch.zeros(3)}}, str(path))
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["iter_2.pth"]


def test_an_interrupted_last_checkpoint_keeps_the_previous_name(tmp_path, monkeypatch):
    backend = get_file_backend(str(tmp_path))  # as the CheckpointHook gets it
    last = tmp_path / "last_checkpoint"
    backend.put_text(str(tmp_path / "iter_2.pth"), last)
    assert last.read_text() == str(tmp_path / "iter_2.pth")

    def torn_put_text(self, obj, filepath, encoding="utf-8"):
        with open(filepath, "w", encoding=encoding) as f:
            f.write(obj[:3])
        raise OSError("No space left on device")

    monkeypatch.setattr(LocalBackend, "put_text", torn_put_text)
    with pytest.raises(OSError, match="No space left on device"):
        backend.put_text(str(tmp_path / "iter_4.pth"), last)
    assert last.read_text() == str(tmp_path / "iter_2.pth")
    assert _listing(tmp_path) == ["last_checkpoint"]
