# UperNet with an MAE ViT-B/16 encoder on ADE20K: 512x512 crops, 160k iterations at batch 16 (8 GPUs x 2).
# The MAE paper's recipe (BEiT's UperNet setup), which mmseg ships as its own MAE config: this inherits that config
# and swaps in mae_transfer's ViTBackbone (any input size, any checkpoint format) and mae_transfer's layer decay rule.
#
# Expected mIoU, ADE20K val, single scale: 48.1 (MAE paper, Table 5); mmseg's run of its own config: 48.13
# (48.70 multi-scale + flip). Train with --amp, as the reference did.
_base_ = 'mmseg::mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mae_transfer.seg'], allow_failed_imports=False)

model = dict(
    # The MAE reference's released encoder as is (any format mae_transfer.checkpoints reads). As in mmseg's own MAE
    # config, the segmentor's `pretrained` names it: --cfg-options model.pretrained=PATH swaps in another.
    pretrained='pretrain/mae_pretrain_vit_base.pth',
    backbone=dict(
        _delete_=True,
        type='ViTBackbone',
        arch='base',
        img_size=512,
        patch_size=16,
        out_indices=(3, 5, 7, 11),
        drop_path_rate=0.1,
        init_values=1.0))  # layer scale, as in the reference ADE20K config
# Inherited from mmseg: Feature2Pyramid neck (rescales 4, 2, 1, 0.5), UPerHead (768 channels, 150 classes),
# auxiliary FCNHead on level 2 with loss weight 0.4, slide inference with 512 crops at stride 341.

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='LayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # Layer decay 0.65 over the 12 blocks; no weight decay on 1-D parameters (biases, norms, layer scale), exactly
    # the groups of mmseg's LayerDecayOptimizerConstructor for its MAE.
    paramwise_cfg=dict(layer_decay_rate=0.65, flat_decay_mult=0.0))
# Inherited: linear warmup over 1500 iterations from 1e-6 x lr, then poly (power 1) down to 0 at 160k.

# Checkpoints that load back with torch.load(weights_only=True) for --resume and tools/test_seg.py
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]

val_evaluator = dict(type='PerClassIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]  # scalars.json + TensorBoard
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
