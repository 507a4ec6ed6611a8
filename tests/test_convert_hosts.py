"""The converter's output in the host frameworks' own loaders (mmseg's is checked in test_seg_backbone.py, on the
bare 'mmseg' state dict this converter writes)."""
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate

from convert_helpers import ROOT, load_tool
from mae_transfer.det import ViTDetCheckpointer
from mae_transfer.models import vit_tiny_patch16

convert_tool = load_tool("convert_checkpoint")


def _vitdet():
    cfg = LazyConfig.load(str(ROOT / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"))
    cfg.model.backbone.net.update(depth=2, window_block_indexes=[0])
    return instantiate(cfg.model)


def test_detectron2_output_loads_into_our_vitdet_config_by_exact_names(tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=2).state_dict()
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert convert_tool.main([str(tmp_path / "mae_pretrain_vit_tiny.pth"), str(tmp_path / "vitdet.pth"),
                              "--to", "detectron2"]) == 0
    model = _vitdet()
    ViTDetCheckpointer(model).load(str(tmp_path / "vitdet.pth"))
    model_sd = model.state_dict()
    kept = [k for k in encoder if k not in ("cls_token", "norm.weight", "norm.bias")]
    assert all(torch.equal(model_sd["backbone.net." + k], encoder[k]) for k in kept)


def test_14px_patches_converted_for_detectron2_are_vitdet_s_p14to16(tmp_path):
    """ViTDet made its ViT-H/16 weights by interpolating the 14x14 kernel bicubically (F.interpolate, align_corners
    False); the converter does so for detectron2, and the detector then holds what loading the original gives."""
    encoder = vit_tiny_patch16(img_size=28, patch_size=14, depth=2).state_dict()  # a 2x2 grid
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_h14.pth")
    assert convert_tool.main([str(tmp_path / "mae_pretrain_vit_h14.pth"), str(tmp_path / "vit_p16.pth"),
                              "--to", "detectron2", "--patch-size", "16", "--img-size", "32"]) == 0
    converted = torch.load(tmp_path / "vit_p16.pth", weights_only=True)["model"]
    by_hand = F.interpolate(encoder["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(converted["backbone.net.patch_embed.proj.weight"], by_hand, rtol=0, atol=0)
    from_converted, from_original = _vitdet(), _vitdet()
    ViTDetCheckpointer(from_converted).load(str(tmp_path / "vit_p16.pth"))
    ViTDetCheckpointer(from_original).load(str(tmp_path / "mae_pretrain_vit_h14.pth"))
    original = from_original.state_dict()
    for key, value in from_converted.state_dict().items():
        if key.startswith("backbone.net."):
            torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
