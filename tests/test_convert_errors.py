"""tools/convert_checkpoint.py on bad input: a clear error naming the problem, and nothing written."""
import os
from fnmatch import fnmatchcase

import pytest
import torch

import mae_transfer.checkpoints.convert as convert_module
from convert_helpers import listing, load_tool, tiny_mae
from mae_transfer.checkpoints import save_checkpoint
from mae_transfer.models import vit_tiny_patch16

convert_tool = load_tool("convert_checkpoint")


@pytest.fixture
def sources(tmp_path):
    mae = tiny_mae()
    torch.save({"model": mae.state_dict()}, tmp_path / "full.pth")
    torch.save({"model": mae.encoder_state_dict()}, tmp_path / "enc.pth")
    torch.save({"model": vit_tiny_patch16(img_size=32, patch_size=8, depth=2, global_pool="avg",
                                          num_classes=10).state_dict()}, tmp_path / "ft.pth")
    vitdet = {"backbone.net." + k: v for k, v in mae.encoder_state_dict().items()  # no cls_token, no final norm
              if k.startswith(("blocks.", "patch_embed.", "pos_embed"))}
    torch.save({"model": vitdet}, tmp_path / "vitdet.pth")
    return tmp_path


def fails(capsys, folder, *argv, match: str) -> None:
    """The tool exits 1 with `match` in its error, and `folder` holds exactly what it held before."""
    before = listing(folder)
    assert convert_tool.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert match in err and "nothing was written" in err, err
    assert listing(folder) == before


def test_unknown_layout(tmp_path, capsys):
    torch.save({"model": {"encoder.conv1.weight": torch.zeros(2)}}, tmp_path / "resnet.pth")
    fails(capsys, tmp_path, tmp_path / "resnet.pth", tmp_path / "out.pth", "--to", "mae",
          match="resnet.pth: unrecognised checkpoint layout (first keys: encoder.conv1.weight)")


def test_missing_truncated_and_malicious_files(sources, capsys):
    fails(capsys, sources, sources / "nope.pth", sources / "out.pth", "--to", "mae", match="not found: ")
    data = (sources / "full.pth").read_bytes()
    (sources / "half.pth").write_bytes(data[: len(data) // 2])
    fails(capsys, sources, sources / "half.pth", sources / "out.pth", "--to", "mae", match="half.pth: not a readable")

    marker = sources / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": tiny_mae().state_dict(), "payload": Exploit()}, sources / "evil.pth")
    fails(capsys, sources, sources / "evil.pth", sources / "out.pth", "--to", "mae", match="evil.pth: refused to load")
    assert not marker.exists()


@pytest.mark.parametrize("src, dst, extra, match", [
    ("enc.pth", "hf", [], "ViTMAEForPreTraining needs the MAE decoder"),
    ("ft.pth", "hf", ["--encoder-only"], "replaces by fc_norm"),
    ("vitdet.pth", "out.safetensors", ["--to", "timm"], "a detectron2 (ViTDet) checkpoint does not keep"),
    ("vitdet.pth", "out.pth", ["--to", "mae"], "a detectron2 (ViTDet) checkpoint does not keep"),
    ("vitdet.pth", "out.pth", ["--to", "mmseg"], "a detectron2 (ViTDet) checkpoint does not keep"),
    ("full.pth", "out.safetensors", ["--to", "mae"], "--to mae writes a .pth file"),
    ("full.pth", "out.pth", [], "--to hf writes a directory"),
    ("full.pth", "out.pth", ["--to", "mae", "--patch-size", "16"], "add --encoder-only"),
    ("full.pth", "out.pth", ["--to", "mae", "--img-size", "36"], "--img-size 36 is not a multiple of the patch size 8"),
])
def test_requests_that_do_not_fit_the_source_or_the_target(sources, capsys, src, dst, extra, match):
    to = [] if "--to" in extra else ["--to", "hf"]
    fails(capsys, sources, sources / src, sources / dst, *to, *extra, match=match)


def test_unknown_target_is_a_usage_error(sources, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_tool.main([str(sources / "full.pth"), str(sources / "out.onnx"), "--to", "onnx"])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--img-size", "--patch-size"])
def test_a_size_of_zero_is_a_usage_error(sources, capsys, flag):
    # not taken as "keep the source's size", which is what leaving the flag out says
    with pytest.raises(SystemExit) as exit_:
        convert_tool.main([str(sources / "full.pth"), str(sources / "out.pth"), "--to", "mae", flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be positive" in capsys.readouterr().err
    assert not (sources / "out.pth").exists()


def test_an_existing_destination_is_never_overwritten(sources, capsys):
    (sources / "precious.pth").write_bytes(b"precious")
    fails(capsys, sources, sources / "full.pth", sources / "precious.pth", "--to", "mae", match="already exists")
    assert (sources / "precious.pth").read_bytes() == b"precious"


@pytest.mark.parametrize("to, dst", [("hf", "out"), ("timm", "out.safetensors")])
def test_a_failed_write_leaves_nothing_behind(sources, capsys, monkeypatch, to, dst):
    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(convert_module, "save_file", disk_full)
    fails(capsys, sources, sources / "full.pth", sources / dst, "--to", to, match="No space left on device")


@pytest.mark.parametrize("missing, what", [
    ("blocks.*", "no blocks.* tensors"),
    ("decoder_embed.weight", "no decoder_embed.weight"),  # mask_token is there: the decoder is expected
    ("decoder_blocks.*", "no decoder_blocks.* tensors"),
    ("blocks.0.mlp.fc1.weight",
     "blocks.0..2 must all hold the same tensors; block(s) 0 lack blocks.0.mlp.fc1.weight"),
    # the last block is there, so the depth reads 3; transformers would initialise the missing one at random
    ("blocks.1.*", "blocks.0..2 must all hold the same tensors; block(s) 1 lack blocks.1.*"),
    ("decoder_blocks.0.*", "decoder_blocks.0..1 must all hold the same tensors; block(s) 0 lack decoder_blocks.0.*"),
    ("decoder_blocks.1.attn.qkv.bias",
     "decoder_blocks.0..1 must all hold the same tensors; block(s) 1 lack decoder_blocks.1.attn.qkv.bias"),
])
def test_an_incomplete_checkpoint_names_the_file_and_the_missing_tensor(tmp_path, capsys, missing, what):
    # Ours (with metadata) is read without layout detection, so even one without blocks reaches the conversion.
    sd = {k: v for k, v in tiny_mae(depth=3).state_dict().items() if not fnmatchcase(k, missing)}
    save_checkpoint(tmp_path / "partial.safetensors", sd, {"model": "tiny"})
    fails(capsys, tmp_path, tmp_path / "partial.safetensors", tmp_path / "out", "--to", "hf",
          match=f"partial.safetensors: incomplete full checkpoint: {what}")
