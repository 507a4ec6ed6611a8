"""The ViTBackbone of mae_transfer.seg: any input size, equality with mmseg's own MAE, checkpoint loading and its
report."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("mmseg")

from mmseg.models.backbones import MAE  # noqa: E402
from mmseg.models.necks import Feature2Pyramid  # noqa: E402
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple  # noqa: E402

from mae_transfer.checkpoints import CheckpointError, FORMATS, read_checkpoint, save_checkpoint  # noqa: E402
from mae_transfer.checkpoints.convert import convert, write  # noqa: E402
from mae_transfer.models import create_model, resize_pos_embed  # noqa: E402
from mae_transfer.seg import ViTBackbone, default_out_indices  # noqa: E402
from mae_transfer.seg.relative_position import RelativePositionBias, resize_relative_position_table  # noqa: E402
from pretrain_helpers import needs_native_bf16  # noqa: E402

# A small ViT: 4 blocks of width 64, 4 heads; trained on 64x64 crops (a 4x4 patch grid).
SMALL = dict(arch="tiny", embed_dim=64, depth=4, num_heads=4, img_size=64, out_indices=(0, 1, 2, 3))


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, the zero-initialised relative position tables and the layer scales included, so that
    a comparison exercises all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_default_out_indices_are_the_reference_blocks():
    assert default_out_indices(12) == (3, 5, 7, 11)  # mmseg's MAE ViT-B config
    assert default_out_indices(24) == (7, 11, 15, 23)  # BEiT-L


def test_layer_scale_starts_at_the_recipe_s_one_by_default():
    backbone = ViTBackbone(arch="tiny", img_size=32, depth=2)  # mmseg's MAE ADE20K configs: init_values=1.0
    gammas = [p for name, p in backbone.named_parameters() if name.endswith(("ls1.gamma", "ls2.gamma"))]
    assert len(gammas) == 4 and all(torch.equal(g, torch.ones_like(g)) for g in gammas)


def test_every_level_at_any_input_size_with_one_model():
    torch.manual_seed(0)
    backbone = ViTBackbone(**SMALL).eval()
    _randomize(backbone)
    neck = Feature2Pyramid(64, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN")).eval()
    # training size, a larger square, and a non-square size that is not a multiple of 16 (padded to 13 x 22 patches)
    for (h, w), grid in [((64, 64), (4, 4)), ((224, 224), (14, 14)), ((512, 512), (32, 32)), ((200, 344), (13, 22))]:
        with torch.no_grad():
            levels = backbone(torch.randn(2, 3, h, w))
            pyramid = neck(levels)
        assert [tuple(x.shape) for x in levels] == [(2, 64, *grid)] * 4
        gh, gw = grid
        assert [tuple(x.shape) for x in pyramid] == [(2, 64, 4 * gh, 4 * gw), (2, 64, 2 * gh, 2 * gw),
                                                     (2, 64, gh, gw), (2, 64, gh // 2, gw // 2)]
        assert all(torch.isfinite(x).all() for x in levels)


def test_running_at_another_size_equals_loading_into_a_model_of_that_size(tmp_path):
    """The two ways to use 64 px weights on 128 px images (resize at forward time; resize when loading into a model
    built for 128 px) resize the position embedding and the relative position tables alike."""
    torch.manual_seed(0)
    trained = ViTBackbone(**SMALL).eval()
    _randomize(trained)
    path = tmp_path / "encoder.safetensors"
    save_checkpoint(path, trained.vit.state_dict())
    at_128 = ViTBackbone(**{**SMALL, "img_size": 128}).eval()
    report = at_128.load_encoder(path)
    assert not report.new and "blocks.0.rel_pos_bias.table" in report.loaded
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(trained(images), at_128(images)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_relative_position_table_resize_by_hand():
    table = torch.randn(7 * 7 + 3, 2)  # a 4x4 grid: 7x7 offsets and the 3 cls entries, 2 heads
    assert resize_relative_position_table(table, (4, 4), (4, 4)) is table
    wider = resize_relative_position_table(table, (4, 4), (6, 4))
    assert wider.shape == (11 * 7 + 3, 2)
    assert torch.equal(wider[-3:], table[-3:])  # cls entries do not depend on the grid
    constant = torch.full((7 * 7 + 3, 2), 0.5)
    torch.testing.assert_close(resize_relative_position_table(constant, (4, 4), (9, 9)),
                               torch.full((17 * 17 + 3, 2), 0.5))
    # the zero offset (the centre of the plane) stays where it was: an odd-sized plane scaled about its centre
    centre = torch.zeros(7 * 7 + 3, 1)
    centre[3 * 7 + 3] = 1.0
    resized = resize_relative_position_table(centre, (4, 4), (7, 7))[:-3].view(13, 13)
    assert resized.argmax() == 6 * 13 + 6
    torch.testing.assert_close(resized, resized.flip(0).flip(1), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="a 5x5 grid needs 84"):
        resize_relative_position_table(table, (5, 5), (4, 4))


def test_a_bias_of_the_row_offset_alone_stays_so_on_a_non_square_grid():
    """A table trained on 4x4 whose bias depends only on the row offset (the plane's row index): at a 3x5 token grid
    (rows and columns resized by different factors) every pair of patches must still get a bias that depends only on
    their row difference, growing with it. Swapping the plane's two axes anywhere breaks this."""
    bias = RelativePositionBias((4, 4), num_heads=1)
    with torch.no_grad():
        rows = torch.arange(7.0).view(7, 1).expand(7, 7)  # plane (2h-1, 2w-1): row index = row offset + 3
        bias.table[:-3] = rows.reshape(-1, 1)
    grid = (3, 5)
    values = bias(grid)[0, 1:, 1:]  # patch pairs, cls left out
    row_of = torch.arange(grid[0] * grid[1]) // grid[1]
    difference = row_of.view(-1, 1) - row_of.view(1, -1)
    by_difference = {}
    for d in range(-grid[0] + 1, grid[0]):
        chosen = values[difference == d]
        torch.testing.assert_close(chosen, chosen[:1].expand_as(chosen), rtol=0, atol=1e-5)
        by_difference[d] = chosen[0].item()
    assert [by_difference[d] for d in sorted(by_difference)] == sorted(by_difference.values())
    assert by_difference[2] > by_difference[0] > by_difference[-2]


def test_gradient_checkpointing_gives_the_plain_gradients():
    plain, checkpointed = ViTBackbone(**SMALL).train(), ViTBackbone(**SMALL, with_cp=True).train()
    _randomize(plain, seed=3)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 80, 48)  # off the training grid: the resized tables are recomputed in the backward too
    for model in (plain, checkpointed):  # the same drop-path draws, which the recomputation must repeat
        torch.manual_seed(1)
        sum(level.square().mean() for level in model(x)).backward()
    plain_grads = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed.vit.blocks[0].rel_pos_bias.table.grad.abs().sum() > 0


def test_gradients_reach_relative_position_tables_at_another_size():
    backbone = ViTBackbone(**SMALL).train()
    sum(x.sum() for x in backbone(torch.randn(1, 3, 80, 48))).backward()
    for block in backbone.vit.blocks:
        assert block.rel_pos_bias.table.grad is not None and block.rel_pos_bias.table.grad.abs().sum() > 0
    assert backbone.vit.pos_embed.grad.abs().sum() > 0


def test_equals_mmseg_mae_with_the_same_converted_weights(tmp_path):
    """Peer check at the training size: the same random weights, written in the 'mmseg' format and loaded by each
    library's own code path, give the same outputs at every level."""
    ours = ViTBackbone(**SMALL).eval()
    _randomize(ours, seed=1)
    mmseg_sd = FORMATS["mmseg"].from_canonical(ours.vit.state_dict())
    path = tmp_path / "backbone_mmseg.pth"
    torch.save(mmseg_sd, path)

    theirs = MAE(img_size=64, patch_size=16, embed_dims=64, num_layers=4, num_heads=4, mlp_ratio=4,
                 out_indices=[0, 1, 2, 3], init_values=1.0, norm_cfg=dict(type="LN", eps=1e-6),
                 init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    theirs.init_weights()
    theirs.eval()  # (BEiT.train returns None, so no chaining)
    # the mapping produces exactly mmseg's parameter names (the relative position index is a derived buffer)
    their_sd = {k: v for k, v in theirs.state_dict().items() if not k.endswith("relative_position_index")}
    assert set(mmseg_sd) == set(their_sd)
    assert all(torch.equal(mmseg_sd[k], their_sd[k]) for k in mmseg_sd)

    reloaded = ViTBackbone(**SMALL, init_cfg=dict(type="Pretrained", checkpoint=str(path))).eval()
    reloaded.init_weights()  # through read_checkpoint's 'mmseg' format detection
    assert read_checkpoint(path).format == "mmseg"

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(x)
        for out in (ours(x), reloaded(x)):
            assert len(out) == len(expected) == 4
            for a, b in zip(out, expected):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_reference_checkpoint_loads_with_an_exact_report(tmp_path):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny_patch16", embed_dim=64, depth=4, num_heads=4)  # pretrained at 224: 14x14 grid
    path = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": mae.state_dict()}, path)  # the reference's layout, decoder included

    backbone = ViTBackbone(**SMALL)
    report = backbone.load_encoder(path)

    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    expected_loaded = {k for k in encoder if not k.startswith("norm.")}
    assert set(report.loaded) == expected_loaded
    assert set(report.new) == {f"blocks.{i}.{name}" for i in range(4)
                               for name in ("rel_pos_bias.table", "ls1.gamma", "ls2.gamma")}
    assert set(report.dropped) == {"norm.weight", "norm.bias"} | {k for k in mae.state_dict() if k not in encoder}
    # every encoder tensor landed; the position embedding resized from 14x14 to the 4x4 training grid
    ours = backbone.vit.state_dict()
    for key in expected_loaded - {"pos_embed"}:
        assert torch.equal(ours[key], encoder[key]), key
    torch.testing.assert_close(ours["pos_embed"], resize_pos_embed(encoder["pos_embed"], (4, 4), (14, 14)))
    assert "blocks.{0..3}.rel_pos_bias.table" in str(report)


def test_a_detectron2_layout_checkpoint_starts_the_cls_token_afresh(tmp_path):
    """detectron2's ViT has no cls token (a converted encoder, a ViTDet detector): every other encoder tensor loads,
    the cls token keeps the backbone's initialisation and the report says it is new."""
    torch.manual_seed(0)
    encoder = create_model("vit_tiny_patch16", embed_dim=64, depth=4, num_heads=4, img_size=64).state_dict()
    torch.save({"model": encoder}, tmp_path / "mae_pretrain.pth")
    vitdet = write(convert(read_checkpoint(tmp_path / "mae_pretrain.pth"), "detectron2"), tmp_path / "vitdet.pth")
    backbone = ViTBackbone(**SMALL)
    initial = backbone.vit.cls_token.detach().clone()
    report = backbone.load_encoder(vitdet)
    assert set(report.new) == {"cls_token"} | {f"blocks.{i}.{name}" for i in range(4)
                                               for name in ("rel_pos_bias.table", "ls1.gamma", "ls2.gamma")}
    assert report.dropped == [] and "cls_token" in str(report).split("new (")[1]
    ours = backbone.vit.state_dict()
    assert torch.equal(ours["cls_token"], initial)
    assert set(report.loaded) == {k for k in encoder if k not in ("cls_token", "norm.weight", "norm.bias")}
    assert all(torch.equal(ours[k], encoder[k]) for k in report.loaded)
    del encoder["cls_token"]  # only detectron2's layout may lack it
    torch.save({"model": encoder}, tmp_path / "no_cls.pth")
    with pytest.raises(CheckpointError, match="lacks tensors the model needs:\n  cls_token"):
        ViTBackbone(**SMALL).load_encoder(tmp_path / "no_cls.pth")


def test_checkpoint_of_another_width_fails_clearly(tmp_path):
    other = create_model("vit_tiny_patch16", embed_dim=96, depth=4, num_heads=4)
    path = tmp_path / "wide.pth"
    torch.save({"model": other.state_dict()}, path)
    backbone = ViTBackbone(**SMALL, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(CheckpointError, match=r"'embed_dim': 96.*'embed_dim': 64"):
        backbone.init_weights()


def test_mmseg_format_round_trip_and_segmentor_state_dicts():
    backbone = ViTBackbone(**SMALL)
    canonical = backbone.vit.state_dict()
    fmt = FORMATS["mmseg"]
    mmseg_sd = fmt.from_canonical(canonical)
    assert fmt.matches(mmseg_sd) and not fmt.matches(canonical)
    assert fmt.to_canonical(mmseg_sd).keys() == canonical.keys()
    # a whole mmseg segmentor's state dict: the backbone is kept, the heads are not encoder weights
    segmentor = {**{f"backbone.{k}": v for k, v in mmseg_sd.items()}, "decode_head.conv_seg.weight": torch.zeros(1)}
    assert fmt.matches(segmentor) and fmt.to_canonical(segmentor).keys() == canonical.keys()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_native_bf16), torch.float16])
def test_cuda_autocast_follows_fp32_and_trains(dtype, fp32_matmuls):
    """On CUDA, under autocast the relative position bias goes into SDPA as a float mask: outputs follow fp32 and a
    GradScaler step reaches every parameter."""
    model = ViTBackbone(**SMALL).cuda()
    _randomize(model, seed=2)
    x = torch.randn(2, 3, 200, 344, device="cuda")
    with torch.no_grad():
        reference = model.eval()(x)
        with torch.autocast("cuda", dtype=dtype):
            low = model(x)
    for a, b in zip(low, reference):
        error = (a.float() - b).norm() / b.norm()
        assert 0 < error < 2e-2  # low precision did run, and stays close
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        loss = sum(level.float().square().mean() for level in model.train()(x))
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_attention_gives_the_math_gradients(fp32_matmuls):
    """On a GPU, SDPA runs the relative position bias through a fused kernel (memory-efficient or cuDNN) whose
    gradient for the mask is its own code: every gradient, the tables' included, must be the plain softmax's."""
    model = ViTBackbone(**SMALL).cuda().train()
    _randomize(model, seed=3)
    x = torch.randn(2, 3, 80, 48, device="cuda")
    grads = []
    for backends in ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH], [SDPBackend.MATH]):
        model.zero_grad()
        with sdpa_kernel(backends, set_priority=True):
            sum(level.square().mean() for level in model(x)).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    fused, math = grads
    for name in math:
        torch.testing.assert_close(fused[name], math[name], rtol=1e-3, atol=1e-6, msg=name)
    assert math["vit.blocks.0.rel_pos_bias.table"].abs().sum() > 0


def test_a_checkpoint_given_both_as_pretrained_and_in_init_cfg_is_refused_naming_the_override():
    with pytest.raises(ValueError, match=r"given twice: pretrained='mine.pth'.*'theirs.pth'.*"
                                         r"model\.pretrained=PATH"):
        ViTBackbone(**SMALL, pretrained="mine.pth", init_cfg=dict(type="Pretrained", checkpoint="theirs.pth"))


def test_the_encoder_s_final_norm_lands_where_mmseg_s_mae_applies_it(tmp_path):
    """norm.* -> ln1.*: mmseg's MAE with final_norm=True must end with exactly that LayerNorm (eps 1e-6, by hand)."""
    ours = ViTBackbone(**SMALL).eval()
    _randomize(ours, seed=4)
    canonical = dict(ours.vit.state_dict(), **{"norm.weight": torch.randn(64), "norm.bias": torch.randn(64)})
    path = tmp_path / "with_norm.pth"
    torch.save(FORMATS["mmseg"].from_canonical(canonical), path)
    theirs = MAE(img_size=64, patch_size=16, embed_dims=64, num_layers=4, num_heads=4, mlp_ratio=4, out_indices=[3],
                 init_values=1.0, final_norm=True, norm_cfg=dict(type="LN", eps=1e-6),
                 init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    theirs.init_weights()
    theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = ours(x)[3].permute(0, 2, 3, 1)  # (B, h, w, C) before any final norm
        by_hand = F.layer_norm(last, (64,), canonical["norm.weight"], canonical["norm.bias"], eps=1e-6)
        torch.testing.assert_close(theirs(x)[0], by_hand.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_a_pos_embed_of_no_square_grid_is_refused_by_name(tmp_path):
    backbone = ViTBackbone(**SMALL)
    state = backbone.vit.state_dict()
    state["pos_embed"] = state["pos_embed"][:, :7]  # cls + 6 patches: no square grid to resize from
    path = tmp_path / "odd.safetensors"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: pos_embed \(1, 7, \d+\) is not 1 prefix row"):
        backbone.load_encoder(path)


def test_a_relative_position_table_of_no_grid_is_refused_by_name(tmp_path):
    backbone = ViTBackbone(**SMALL)
    state = backbone.vit.state_dict()
    state["blocks.2.rel_pos_bias.table"] = torch.zeros(50, 4)  # 47 offsets: no (2h-1)(2w-1) of a square grid
    path = tmp_path / "odd.safetensors"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: blocks\.2\.rel_pos_bias\.table: a relative "
                                              r"position table of 50 rows fits neither the backbone's 4x4 grid"):
        backbone.load_encoder(path)


@pytest.mark.parametrize("new_grid", [(6, 6), (9, 9), (7, 5)])
def test_relative_position_table_resize_equals_timm_s(new_grid):
    # timm's resize_rel_pos_bias_table_simple: the same flat ((2h-1)(2w-1) + extra, heads) layout, extras last
    table = torch.randn(7 * 7 + 3, 4)  # trained on a 4x4 grid, 4 heads
    rows = (2 * new_grid[0] - 1) * (2 * new_grid[1] - 1) + 3
    torch.testing.assert_close(resize_relative_position_table(table, (4, 4), new_grid),
                               resize_rel_pos_bias_table_simple(table, new_grid, (rows, 4)), rtol=0, atol=1e-6)


def test_a_non_square_input_equals_loading_into_a_model_of_that_size(tmp_path):
    # rows != columns: the forward-time resize must follow the (rows, cols) grid as loading does (test_pos_embed.py)
    trained = ViTBackbone(**SMALL).eval()
    _randomize(trained, seed=5)
    path = save_checkpoint(tmp_path / "encoder.safetensors", trained.vit.state_dict())
    built = ViTBackbone(**{**SMALL, "img_size": (96, 160)}).eval()  # a 6 x 10 patch grid
    built.load_encoder(path)
    images = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        for a, b in zip(trained(images), built(images)):
            assert a.shape == (2, 64, 6, 10)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
