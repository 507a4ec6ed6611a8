"""The converter's output in the host frameworks' own loaders (mmseg's is checked in test_seg_backbone.py, on the
bare 'mmseg' state dict this converter writes)."""
import torch
from detectron2.config import LazyConfig, instantiate

from convert_helpers import ROOT, load_tool
from mae_transfer.det import ViTDetCheckpointer
from mae_transfer.models import vit_tiny_patch16

convert_tool = load_tool("convert_checkpoint")


def test_detectron2_output_loads_into_our_vitdet_config_by_exact_names(tmp_path):
    encoder = vit_tiny_patch16(img_size=64, depth=2).state_dict()
    torch.save({"model": encoder}, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert convert_tool.main([str(tmp_path / "mae_pretrain_vit_tiny.pth"), str(tmp_path / "vitdet.pth"),
                              "--to", "detectron2"]) == 0
    cfg = LazyConfig.load(str(ROOT / "det_configs" / "mask_rcnn_vit_tiny_synthetic.py"))
    cfg.model.backbone.net.update(depth=2, window_block_indexes=[0])
    model = instantiate(cfg.model)
    ViTDetCheckpointer(model).load(str(tmp_path / "vitdet.pth"))
    model_sd = model.state_dict()
    kept = [k for k in encoder if k not in ("cls_token", "norm.weight", "norm.bias")]
    assert all(torch.equal(model_sd["backbone.net." + k], encoder[k]) for k in kept)
