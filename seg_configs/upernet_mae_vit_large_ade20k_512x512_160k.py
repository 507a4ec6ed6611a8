# UperNet with an MAE ViT-L/16 encoder on ADE20K: 512x512 crops, 160k iterations at batch 16 (8 GPUs x 2).
#
# Expected mIoU, ADE20K val, single scale: 53.6 (MAE paper, Table 5).
# The paper publishes no ViT-L segmentation config (it searched the lr of every entry). This keeps the ViT-B recipe
# and takes BEiT-L's architecture choices (drop path 0.2, outputs of blocks 7/11/15/23, 1024-wide heads), with the
# layer decay the MAE reference fine-tunes ViT-L with (0.75; 0.65 for ViT-B): the lr is the first thing to tune.
_base_ = './upernet_mae_vit_base_ade20k_512x512_160k.py'

model = dict(
    pretrained='pretrain/mae_pretrain_vit_large.pth',
    backbone=dict(arch='large', out_indices=(7, 11, 15, 23), drop_path_rate=0.2),
    neck=dict(embed_dim=1024),
    decode_head=dict(in_channels=[1024, 1024, 1024, 1024], channels=1024),
    auxiliary_head=dict(in_channels=1024))

optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.75))
