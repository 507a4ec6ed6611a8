import argparse
import errno
import os
import pickle
import re
import stat
import tempfile

import numpy as np
import pytest
import torch

import mae_transfer.checkpoints.io as ckpt_io
from mae_transfer.checkpoints import (CheckpointError, atomic_directory, atomic_path, load_into, read_checkpoint,
                                      read_file, save_checkpoint, save_training_state, load_training_state,
                                      load_whole_model, summarize_keys)
from mae_transfer.checkpoints.convert import convert, write
from mae_transfer.models import MaskedAutoencoderViT, vit_tiny_patch16

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_encoder(**kw):
    return vit_tiny_patch16(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), **kw})


def reference_file(path, state_dict):
    """A file as the MAE reference's training loop writes it, argparse.Namespace included."""
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mae_vit_base_patch16")}, path)
    return path


def test_reference_kinds_are_recognised(tmp_path):
    mae = MaskedAutoencoderViT(**TINY)
    full = read_checkpoint(reference_file(tmp_path / "mae_pretrain_vit_tiny_full.pth", mae.state_dict()))
    assert (full.format, full.kind) == ("mae", "full")
    assert full.extras["epoch"] == 799 and full.extras["args"].model == "mae_vit_base_patch16"
    encoder = read_checkpoint(reference_file(tmp_path / "enc.pth", mae.encoder_state_dict()))
    assert (encoder.format, encoder.kind) == ("mae", "encoder")
    finetuned = tiny_encoder(global_pool="avg", num_classes=10).state_dict()
    assert read_checkpoint(reference_file(tmp_path / "ft.pth", finetuned)).kind == "finetuned"
    torch.save(mae.encoder_state_dict(), tmp_path / "timm.pth")
    assert read_checkpoint(tmp_path / "timm.pth").format == "timm"
    assert full.arch() == dict(embed_dim=32, depth=2, patch_size=8, in_chans=3, img_size=32, num_heads=None,
                               mlp_ratio=4.0, decoder_embed_dim=16, decoder_depth=1)
    assert full.decoder_num_heads is None  # its recorded --model (ViT-B) is not the model its tensors are


def test_ours_roundtrip_with_metadata(tmp_path):
    mae = MaskedAutoencoderViT(**TINY)
    path = save_checkpoint(tmp_path / "ours.safetensors", mae.state_dict(), {"model": "tiny", "num_heads": 2})
    ckpt = read_checkpoint(path)
    assert ckpt.format == "mae_transfer" and ckpt.meta["model"] == "tiny" and ckpt.arch()["num_heads"] == 2
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in ckpt.state_dict.items())
    assert sorted(ckpt.state_dict) == sorted(mae.state_dict())


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"w": torch.zeros(1)}, "payload": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused to load") as refused:
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    # the refused global by name (os.system pickles as posix.system on Linux), not torch's advice to allow it
    assert f"(the weights-only unpickler stopped at: GLOBAL {os.system.__module__}.system)" in str(refused.value)
    assert "add_safe_globals" not in str(refused.value)


def model_zoo_pickle(path, state_dict, protocol=pickle.HIGHEST_PROTOCOL):
    """A file as detectron2's model zoo ships one: a plain pickle of numpy arrays."""
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "Detectron2 Model Zoo"}, f,
                    protocol=protocol)
    return path


@pytest.mark.parametrize("protocol, numpy_module", [(4, None), (5, None), (2, "numpy.core.multiarray"),
                                                    (2, "numpy._core.multiarray")])
def test_a_model_zoo_pkl_reads_as_tensors_whichever_numpy_wrote_it(tmp_path, protocol, numpy_module):
    sd = {"backbone.net.pos_embed": torch.randn(1, 5, 4), "roi_heads.box_predictor.cls_score.bias": torch.arange(3.0),
          "step": torch.tensor(7), "half": torch.randn(2).half()}
    path = model_zoo_pickle(tmp_path / "model_final.pkl", sd, protocol)
    if numpy_module:  # protocol 2 spells globals as text: name the array constructor as NumPy 1 or NumPy 2 does
        path.write_bytes(path.read_bytes().replace(b"numpy.core.multiarray", numpy_module.encode()))
    torch.save({"model": sd, "__author__": "Detectron2 Model Zoo"}, tmp_path / "torch_saved.pkl")
    for obj, meta in (read_file(path), read_file(tmp_path / "torch_saved.pkl")):  # (a torch.save file named .pkl)
        assert meta == {} and obj["__author__"] == "Detectron2 Model Zoo" and obj["model"].keys() == sd.keys()
        for k, v in sd.items():
            assert isinstance(obj["model"][k], torch.Tensor) and obj["model"][k].dtype == v.dtype
            assert torch.equal(obj["model"][k], v), k


def test_a_pkl_that_pickles_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(1)}, "payload": Exploit()}))
    with pytest.raises(CheckpointError, match=r"model_final\.pkl: refused to load: .* asks for io\.open"):
        read_checkpoint(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is live: plain unpickling, as detectron2 does, runs it
        pickle.load(f)
    assert marker.exists()


class _DTypeWithState:
    """Pickles as numpy pickles a dtype, with a state of the file's choosing."""

    def __init__(self, spec, state):
        self.spec, self.state = spec, state

    def __reduce__(self):
        return np.dtype, (self.spec, False, True), self.state


class _ArrayWithState:
    """Pickles as numpy pickles an array (protocols 0-4), with a state of the file's choosing."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), self.state


class _ScalarOf:
    def __init__(self, dtype, data):
        self.dtype, self.data = dtype, data

    def __reduce__(self):
        return np.core.multiarray.scalar, (self.dtype, self.data)


POINTER = (0x4141414141414141).to_bytes(8, "little")


@pytest.mark.parametrize("payload, refused", [
    # an object dtype whose state clears its reference flags: numpy would read the bytes as object pointers
    (_ArrayWithState((1, (1,), _DTypeWithState("O8", (3, "|", None, None, None, -1, -1, 0)), False, POINTER)),
     "numpy dtype 'O8'"),
    (_ScalarOf(_DTypeWithState("O8", (3, "|", None, None, None, -1, -1, 0)), POINTER), "numpy dtype 'O8'"),
    # a numeric dtype whose state claims it holds objects
    (_ArrayWithState((1, (1,), _DTypeWithState("f8", (3, "<", None, None, None, -1, -1, 1)), False, POINTER)),
     "numpy dtype state"),
    (np.array(["text"]), "numpy dtype 'U4'"),  # strings: not weights
    (np.array([None]), "numpy dtype 'O8'"),  # objects
    # data that is not exactly the array's bytes
    (_ArrayWithState((1, (4,), np.dtype("f4"), False, b"\0" * 8)), "with 8 bytes of data"),
    (_ArrayWithState((1, (2,), np.dtype("f4"), False, b"\0" * 12)), "with 12 bytes of data"),  # too many, too
])
def test_a_pkl_whose_arrays_are_not_plain_numbers_is_refused(tmp_path, payload, refused):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": payload}}, protocol=2))
    with pytest.raises(CheckpointError, match=rf"model_final\.pkl: refused to load: the pickle asks for [^;]*"
                                              rf"{re.escape(refused)}"):
        read_file(path)


def test_a_pkl_cannot_change_the_unpickler_s_globals(tmp_path):
    # protocol 0 by hand: numpy.ndarray, then a BUILD that would set an attribute on whatever stands for it
    path = tmp_path / "model_final.pkl"
    path.write_bytes(b"cnumpy\nndarray\n(}(Vx\nI1\ndtb.")
    with pytest.raises(CheckpointError, match="asks for a change to a global"):
        read_file(path)
    model_zoo_pickle(path, {"w": torch.ones(2)})  # and the next file reads as before
    assert torch.equal(read_file(path)[0]["model"]["w"], torch.ones(2))


def test_other_numeric_arrays_and_torch_s_legacy_format_named_pkl(tmp_path):
    arrays = {"big_endian": np.arange(4, dtype=">f4"), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              "bools": np.array([True, False]), "bytes": np.arange(3, dtype=np.uint8), "empty": np.zeros((0, 3)),
              "step": np.int64(7)}
    path = tmp_path / "model_final.pkl"
    for protocol in (2, 5):
        path.write_bytes(pickle.dumps({"model": arrays}, protocol=protocol))
        got = read_file(path)[0]["model"]
        for k, v in arrays.items():
            expected = v.item() if k == "step" else torch.from_numpy(v.astype(v.dtype.newbyteorder("=")))
            assert (got[k] == expected) if k == "step" else torch.equal(got[k], expected), (k, protocol)
    # torch.save's legacy (non-zip) format, named .pkl: its first pickle is torch's magic number, then torch.load
    torch.save({"model": {"w": torch.arange(3.0)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_file(path)[0]["model"]["w"], torch.arange(3.0))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pkl"])
def test_truncated_file_gets_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    sd = tiny_encoder().state_dict()
    {".safetensors": lambda: save_checkpoint(path, sd), ".pth": lambda: torch.save({"model": sd}, path),
     ".pkl": lambda: model_zoo_pickle(path, sd)}[suffix]()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"model{suffix}"):
        read_checkpoint(path)


def test_a_state_dict_of_the_ddp_wrapper_reads_as_the_model_s(tmp_path):
    sd = tiny_encoder().state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.pth")
    ckpt = read_checkpoint(tmp_path / "ddp.pth")
    assert (ckpt.format, sorted(ckpt.state_dict)) == ("mae", sorted(sd))


def test_not_a_checkpoint_and_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        read_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        read_checkpoint(tmp_path / "other.pth")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "meta.safetensors"), metadata={"mae_transfer": "{not json"})
    with pytest.raises(CheckpointError, match=r"meta\.safetensors: its 'mae_transfer' header metadata is not JSON"):
        read_checkpoint(tmp_path / "meta.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "list.safetensors"), metadata={"mae_transfer": "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"list\.safetensors: its 'mae_transfer' header metadata is not a JSON "
                                              r"object \(found list\)"):
        read_checkpoint(tmp_path / "list.safetensors")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_destination_that_appears_during_a_conversion_is_not_overwritten(tmp_path, monkeypatch, hard_links):
    """convert checks its destination first, but a conversion takes a while: a file or directory created there
    meanwhile survives, and the conversion leaves nothing behind; also on filesystems without hard links."""
    ours = save_checkpoint(tmp_path / "ours.safetensors", MaskedAutoencoderViT(**TINY).state_dict(),
                           {"num_heads": 2, "decoder_num_heads": 2})
    if not hard_links:
        def no_links(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(ckpt_io.os, "link", no_links)
        first = write(convert(read_checkpoint(ours), "timm"), tmp_path / "first.safetensors")  # writes still work
        assert read_checkpoint(first).format == "timm"
        first.unlink()
    conversions = {"mae": tmp_path / "out.pth", "timm": tmp_path / "out.safetensors", "hf": tmp_path / "out_hf"}
    for to, dst in conversions.items():
        conversion = convert(read_checkpoint(ours), to)

        def checked_then_taken(fmt, path):  # the destination is new when checked, taken right after
            path.mkdir() if path.suffix == "" else path.write_text("someone else's")
            return path
        monkeypatch.setattr("mae_transfer.checkpoints.convert.check_destination", checked_then_taken)
        with pytest.raises(CheckpointError, match="appeared while it was being written; not overwriting it"):
            write(conversion, dst)
        assert not any(dst.iterdir()) if to == "hf" else dst.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ours.safetensors", "out.pth", "out.safetensors",
                                                                 "out_hf"])


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_directories_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        sd = MaskedAutoencoderViT(**TINY).state_dict()
        ours = save_checkpoint(tmp_path / "ours.safetensors", sd, {"num_heads": 2, "decoder_num_heads": 2})
        save_training_state(tmp_path / "state.pth", {"model": sd})
        hf_dir = write(convert(read_checkpoint(ours), "hf"), tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"ours.safetensors": file_mode, "state.pth": file_mode, "hf": dir_mode,
                     "hf/config.json": file_mode, "hf/model.safetensors": file_mode}
    assert hf_dir == tmp_path / "hf"


def test_a_writer_s_private_temporary_does_not_make_the_checkpoint_private(tmp_path):
    # safetensors >= 0.8 writes every file as a 0o600 temporary renamed into place (safetensors#782); a writer
    # doing so here still leaves a file with the mode the umask gives, inside a directory or not.
    def write_privately(path):
        fd, private = tempfile.mkstemp(dir=path.parent)  # 0o600
        os.write(fd, b"weights")
        os.close(fd)
        os.replace(private, path)

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            write_privately(tmp)
        with atomic_directory(tmp_path / "hf") as tmp:
            write_privately(tmp / "model.safetensors")
    finally:
        os.umask(old)
    for path in (tmp_path / "model.safetensors", tmp_path / "hf" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes() == b"weights"


def test_incomplete_checkpoint_names_the_file_and_the_missing_tensor(tmp_path):
    sd = MaskedAutoencoderViT(**TINY).state_dict()
    del sd["decoder_embed.weight"]  # the decoder's mask_token is there, so this is a full checkpoint, cut short
    path = save_checkpoint(tmp_path / "partial.safetensors", sd)
    ckpt = read_checkpoint(path)
    for describe in (ckpt.arch, lambda: ckpt.decoder_num_heads):
        with pytest.raises(CheckpointError) as error:
            describe()
        assert str(error.value) == f"{path}: incomplete full checkpoint: no decoder_embed.weight"


def test_training_state_roundtrip(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "rng": torch.get_rng_state(), "lr": [0.1, 0.2]}
    loaded = load_training_state(save_training_state(tmp_path / "state.pth", state))
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_key_summaries_name_exactly_the_blocks_listed():
    keys = [f"blocks.{i}.attn.proj.bias" for i in (9, 3, 0, 1, 2, 3)] + ["decoder_blocks.4.norm1.weight", "cls_token"]
    assert summarize_keys(keys) == ["blocks.{0..3,9}.attn.proj.bias", "cls_token", "decoder_blocks.{4}.norm1.weight"]
    assert summarize_keys(["blocks.3.mlp.fc1.weight", "blocks.9.mlp.fc1.weight"]) == ["blocks.{3,9}.mlp.fc1.weight"]


def test_a_whole_model_of_another_class_count_loads_all_but_its_classifier():
    class Detector(torch.nn.Module):
        def __init__(self, classes: int, width: int = 4):
            super().__init__()
            self.body, self.cls_score = torch.nn.Linear(3, width), torch.nn.Linear(width, classes)

    warnings = []
    model = Detector(5)
    trained = Detector(81).state_dict()  # COCO's 80 + background -> your 4 + background
    report = load_whole_model(model, trained, source="d.pth", class_specific=["cls_score.*"], warn=warnings.append)
    assert sorted(report.new) == ["cls_score.bias", "cls_score.weight"]
    assert torch.equal(model.body.weight, trained["body.weight"]) and model.cls_score.weight.shape == (5, 4)
    assert warnings == ["d.pth was trained for another number of classes: its class-specific tensors are not loaded "
                        "(cls_score.weight, cls_score.bias)"]
    # Another input width is not another class count: refused, even for a class-specific tensor.
    with pytest.raises(CheckpointError, match=r"cls_score.weight: w.pth \(5, 8\) vs model \(5, 4\)"):
        load_whole_model(Detector(5), Detector(5, width=8).state_dict(), source="w.pth",
                         class_specific=["cls_score.*"], warn=warnings.append)


def test_load_into_reports_and_rejects():
    source = tiny_encoder().state_dict()
    target = tiny_encoder(global_pool="avg", num_classes=5)
    report = load_into(target, source, new=["head.*", "fc_norm.*"])
    assert sorted(report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.dropped) == ["norm.bias", "norm.weight"]
    assert "blocks.{0..1}.attn.qkv.weight" in str(report)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source["blocks.1.attn.qkv.weight"])
    with pytest.raises(CheckpointError, match="lacks tensors the model needs"):
        load_into(tiny_encoder(global_pool="avg", num_classes=5), source, new=["head.*"])
    wide = tiny_encoder(embed_dim=64).state_dict()
    with pytest.raises(CheckpointError, match=r"64 wide, the model 32(.|\n)*cls_token: checkpoint \(1, 1, 64\)"):
        load_into(tiny_encoder(), wide)


def test_a_ddp_era_module_container_reads_as_the_model_s(tmp_path):
    sd = tiny_encoder().state_dict()
    torch.save({"module": sd, "epoch": 3}, tmp_path / "ddp_era.pth")  # {'module': ...}, as older trainers saved
    ckpt = read_checkpoint(tmp_path / "ddp_era.pth")
    assert sorted(ckpt.state_dict) == sorted(sd) and all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())
    assert ckpt.kind == "encoder" and ckpt.extras == {"epoch": 3}
