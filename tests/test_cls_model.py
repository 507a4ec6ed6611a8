"""Classifier building for the three protocols: heads, what trains, optimizer groups, and loading encoders."""
import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mae_transfer.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from mae_transfer.checkpoints.convert import convert, write
from mae_transfer.cls import LARS, build_classifier, build_optimizer, load_pretrained, trainable_names
from mae_transfer.models import mae_vit_tiny_patch16

DEPTH = 4
SMALL = dict(embed_dim=48, depth=DEPTH, num_heads=3)  # a 4-block ViT on 32 px images: 4 patches of 16


def classifier(mode="finetune", global_pool=True, partial_blocks=0, img_size=32, num_classes=5):
    return build_classifier("vit_tiny_patch16", num_classes, mode=mode, global_pool=global_pool, img_size=img_size,
                            partial_blocks=partial_blocks, **SMALL)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _train_step(net, optimizer, seed=0):
    """One optimizer step on random data; returns the parameters and buffers before it."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    net.train()
    F.cross_entropy(net(images), labels).backward()
    optimizer.step()
    return before


def _changed(net, before):
    return {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}


def test_heads_follow_the_reference_init():
    ft = classifier("finetune", num_classes=1000)  # 48k head weights: enough to measure their spread
    assert isinstance(ft.head, nn.Linear) and isinstance(ft.norm, nn.Identity) and isinstance(ft.fc_norm, nn.LayerNorm)
    assert ft.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)  # trunc_normal at +-2 absolute: no cut
    assert torch.all(ft.head.bias == 0)

    lp = classifier("linprobe", global_pool=False, num_classes=1000)
    bn, linear = lp.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(lp.fc_norm, nn.Identity) and isinstance(lp.norm, nn.LayerNorm)  # the cls token path
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.all(linear.bias == 0)


def test_trainable_sets_per_protocol():
    assert set(trainable_names(classifier("finetune"))) == {n for n, _ in classifier("finetune").named_parameters()}
    assert trainable_names(classifier("linprobe")) == ["head.1.weight", "head.1.bias"]
    partial = set(trainable_names(classifier("partial", partial_blocks=2)))
    assert {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("blocks.") else n.split(".")[0]
            for n in partial} == {"blocks.2", "blocks.3", "fc_norm", "head"}
    assert "norm.weight" in trainable_names(classifier("partial", global_pool=False, partial_blocks=1))
    # K = 0 is linear probing: the same model, the same trainable parameters
    zero = classifier("partial", partial_blocks=0)
    assert isinstance(zero.head, nn.Sequential) and trainable_names(zero) == ["head.1.weight", "head.1.bias"]
    with pytest.raises(ValueError, match="exceeds the model's 4 blocks"):
        classifier("partial", partial_blocks=5)


def test_finetune_groups_have_layer_decay_and_no_decay_on_biases_norms_tokens():
    depth, decay = DEPTH, 0.65
    net = classifier("finetune")
    optimizer = build_optimizer(net, "finetune", lr=1e-3, weight_decay=0.05, layer_decay=decay)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    scale = {n: g["lr_scale"] for g in optimizer.param_groups for n in _names(net, g)}
    wd = {n: g["weight_decay"] for g in optimizer.param_groups for n in _names(net, g)}
    assert set(scale) == {n for n, _ in net.named_parameters()}
    # reference.md: num_layers = depth + 1, scale = decay ** (num_layers - layer_id)
    # (layer_id 0 for the embeddings, i + 1 for block i, num_layers for the rest)
    expected = {"cls_token": decay ** (depth + 1), "pos_embed": decay ** (depth + 1),
                "patch_embed.proj.weight": decay ** (depth + 1), "blocks.0.norm1.weight": decay ** depth,
                "blocks.1.attn.qkv.weight": decay ** (depth - 1), "blocks.3.mlp.fc2.bias": decay ** (depth - 3),
                "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    for name, value in expected.items():
        assert scale[name] == pytest.approx(value), name
    no_decay = {n for n, v in wd.items() if v == 0.0}
    assert no_decay == {n for n, p in net.named_parameters() if p.ndim == 1} | {"cls_token", "pos_embed"}
    assert wd["blocks.2.attn.proj.weight"] == wd["head.weight"] == wd["patch_embed.proj.weight"] == 0.05


def test_partial_groups_hold_only_the_tuned_parameters():
    net = classifier("partial", partial_blocks=1)
    optimizer = build_optimizer(net, "partial", lr=1e-3, weight_decay=0.05, layer_decay=0.75, partial_blocks=1)
    grouped = set().union(*(_names(net, g) for g in optimizer.param_groups))
    assert grouped == set(trainable_names(net))
    scale = {n: g["lr_scale"] for g in optimizer.param_groups for n in _names(net, g)}
    assert scale["blocks.3.attn.qkv.weight"] == pytest.approx(0.75) and scale["head.weight"] == 1.0


def test_linear_probe_step_changes_only_the_head():
    net = classifier("linprobe")
    optimizer = build_optimizer(net, "linprobe", lr=0.1, weight_decay=0.0)
    assert isinstance(optimizer, LARS)
    before = _train_step(net, optimizer)
    # the head's weights and its BatchNorm statistics move; no encoder tensor does
    assert _changed(net, before) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                                     "head.1.weight", "head.1.bias"}


@pytest.mark.parametrize("k", [1, 2])
def test_partial_step_changes_exactly_the_last_k_blocks_norm_and_head(k):
    net = classifier("partial", partial_blocks=k)
    optimizer = build_optimizer(net, "partial", lr=1e-2, weight_decay=0.05, layer_decay=0.75, partial_blocks=k)
    before = _train_step(net, optimizer)
    changed = _changed(net, before)
    expected = {n for n in before if n.startswith(("head.", "fc_norm."))
                or any(n.startswith(f"blocks.{i}.") for i in range(DEPTH - k, DEPTH))}
    assert changed == expected


# ------------------------------------------------------------------------------------------- loading encoders
def _pretrained(tmp_path, img_size=32, kind="encoder", fmt="mae"):
    """A pretraining checkpoint of a 4-block MAE in a released layout: the reference's {'model': ...}, timm's bare
    state dict, or ours."""
    mae = mae_vit_tiny_patch16(img_size=img_size, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                               **SMALL)
    sd = mae.encoder_state_dict() if kind == "encoder" else mae.state_dict()
    path = tmp_path / f"{kind}-{fmt}-{img_size}.pth"
    if fmt == "mae":
        torch.save({"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny_patch16")}, path)
    elif fmt == "timm":
        torch.save(sd, path)
    else:
        path = save_checkpoint(path.with_suffix(".safetensors"), sd, {"model": "mae_vit_tiny_patch16"})
    return path, sd


@pytest.mark.parametrize("kind, fmt", [("encoder", "mae"), ("full", "mae"), ("encoder", "timm"),
                                       ("full", "mae_transfer")])
def test_loading_reports_exactly_the_new_head_and_fc_norm(tmp_path, kind, fmt):
    path, sd = _pretrained(tmp_path, kind=kind, fmt=fmt)
    net = classifier("finetune")
    report, found = load_pretrained(net, path)
    assert found == fmt
    assert sorted(report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.dropped) == ["norm.bias", "norm.weight"]  # global pooling replaces the final norm
    for name, value in net.state_dict().items():
        if name in sd:
            assert torch.equal(value, sd[name]), name

    cls_net = classifier("linprobe", global_pool=False)
    report, _ = load_pretrained(cls_net, path)
    assert sorted(report.new) == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                                  "head.1.bias", "head.1.weight"]
    assert report.dropped == [] and torch.equal(cls_net.norm.weight, sd["norm.weight"])


def test_a_detectron2_layout_encoder_starts_the_cls_token_afresh_unless_it_is_pooled(tmp_path):
    """detectron2's ViT has no cls token (a converted encoder, a ViTDet detector): a global-pool classifier starts
    its own, attended to but never pooled; one that pools it (--cls_token, linear probing) is refused."""
    path, sd = _pretrained(tmp_path)
    vitdet = write(convert(read_checkpoint(path), "detectron2"), tmp_path / "vit_tiny_detectron2.pth")
    net = classifier("finetune")
    initial = net.cls_token.detach().clone()
    report, found = load_pretrained(net, vitdet)
    assert found == "detectron2"
    assert sorted(report.new) == ["cls_token", "fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.dropped == [] and "cls_token" in str(report).split("new (")[1]
    assert torch.equal(net.cls_token, initial)
    for name, value in net.state_dict().items():
        if name in sd and name != "cls_token":
            assert torch.equal(value, sd[name]), name

    for mode in ("finetune", "linprobe"):
        with pytest.raises(CheckpointError, match=rf"{vitdet} \(detectron2\) holds no cls token, which this "
                                                  r"classifier pools: add --global_pool"):
            load_pretrained(classifier(mode, global_pool=False), vitdet)


def test_anything_else_missing_is_an_error(tmp_path):
    path, sd = _pretrained(tmp_path)
    del sd["blocks.2.mlp.fc1.weight"]
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"lacks tensors the model needs:\n  blocks\.\{2\}\.mlp\.fc1\.weight"):
        load_pretrained(classifier("finetune"), path)
    with pytest.raises(CheckpointError, match="wrong model size"):
        load_pretrained(build_classifier("vit_tiny_patch16", 5, img_size=32, depth=DEPTH), _pretrained(tmp_path)[0])
    path, sd = _pretrained(tmp_path)
    del sd["cls_token"]  # only detectron2's layout may lack it
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"lacks tensors the model needs:\n  cls_token"):
        load_pretrained(classifier("finetune"), path)


def test_a_tensor_with_no_place_in_the_classifier_is_an_error(tmp_path):
    path, sd = _pretrained(tmp_path)
    sd["blocks.0.ls1.gamma"] = torch.ones(sd["cls_token"].shape[-1])  # a segmentation backbone's trained part
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"has tensors the model has no place for:\n  blocks\.\{0\}\.ls1\.gamma"):
        load_pretrained(classifier("finetune"), path)


def test_a_pos_embed_of_no_square_grid_is_refused_naming_the_file(tmp_path):
    path, sd = _pretrained(tmp_path, img_size=32)
    sd["pos_embed"] = sd["pos_embed"][:, :4]  # cls + 3 patches
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=rf"{path.name}: pos_embed \(1, 4, 48\) is not 1 prefix row\(s\) plus "
                                              r"a square grid"):
        load_pretrained(classifier("finetune", img_size=64), path)


def test_pos_embed_resized_to_the_input_size_keeps_cls_and_matches_bicubic_by_hand(tmp_path):
    path, sd = _pretrained(tmp_path, img_size=32)  # 2 x 2 patches of 16
    net = classifier("finetune", img_size=64)        # 4 x 4 patches
    load_pretrained(net, path)
    old = sd["pos_embed"]
    assert net.pos_embed.shape == (1, 17, 48)
    assert torch.equal(net.pos_embed[:, :1], old[:, :1])
    grid = old[:, 1:].reshape(1, 2, 2, 48).permute(0, 3, 1, 2)
    by_hand = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(net.pos_embed[:, 1:], by_hand.permute(0, 2, 3, 1).reshape(1, 16, 48))
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_a_finetuned_checkpoint_gives_its_encoder_and_leaves_its_head_and_fc_norm_behind(tmp_path):
    """Fine-tuning from an already fine-tuned model (main_finetune's {'model': ...}, 7 classes): its head and
    fc_norm stay behind (module docstring), so a classifier of another class count starts, and one of the same
    count starts its own head rather than the old one."""
    torch.manual_seed(0)
    finetuned = build_classifier("vit_tiny_patch16", 7, img_size=32, **SMALL).state_dict()
    torch.save({"model": finetuned, "epoch": 99}, tmp_path / "checkpoint-99.pth")
    for num_classes in (5, 7):
        net = classifier("finetune", num_classes=num_classes)
        init = {k: v.clone() for k, v in net.state_dict().items()}
        report, _ = load_pretrained(net, tmp_path / "checkpoint-99.pth")
        assert sorted(report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"], num_classes
        for name, value in net.state_dict().items():
            expected = init[name] if name.startswith(("head.", "fc_norm.")) else finetuned[name]
            assert torch.equal(value, expected), (num_classes, name)
