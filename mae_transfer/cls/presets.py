r"""Defaults of tools/train_cls.py: per protocol, and named presets for the paper's documented recipes.

A flag given on the command line always wins over a preset, and a preset over the protocol's defaults:

    python tools/train_cls.py --preset finetune-base --finetune mae_pretrain_vit_base.pth \
        --dataset inat2018 --data_path /datasets/inat2018

Batch sizes are per GPU; the recipes' effective batch (1024 for fine-tuning, 16384 for linear probing) is reached
with gradient accumulation on however many GPUs there are: accum_iter = effective / (batch_size * GPUs).
"""

# The argparse defaults of the reference's main_finetune.py and main_linprobe.py (not their documented recipes).
MODE_DEFAULTS = {
    "finetune": dict(batch_size=64, epochs=50, blr=1e-3, layer_decay=0.75, weight_decay=0.05, drop_path=0.1,
                     warmup_epochs=5, min_lr=1e-6, smoothing=0.1, aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.0,
                     cutmix=0.0, global_pool=True),
    "linprobe": dict(batch_size=512, epochs=90, blr=0.1, layer_decay=1.0, weight_decay=0.0, drop_path=0.0,
                     warmup_epochs=10, min_lr=0.0, smoothing=0.0, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0,
                     global_pool=False),
}
# The paper tunes partially with the fine-tuning recipe (only the number of epochs changes).
MODE_DEFAULTS["partial"] = MODE_DEFAULTS["finetune"]

# FINETUNE.md / paper Table 9: AdamW, effective batch 1024, wd 0.05, 5 warmup epochs, min lr 1e-6, mixup 0.8,
# cutmix 1.0, label smoothing 0.1, RandAugment m9-mstd0.5, random erasing 0.25, global pooling + fc_norm.
# The same recipe serves iNaturalist and Places (the paper adjusts only lr and epochs per dataset).
_FINETUNE = dict(mode="finetune", input_size=224, batch_size=32, effective_batch_size=1024, weight_decay=0.05,
                 warmup_epochs=5, min_lr=1e-6, mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1",
                 reprob=0.25, global_pool=True)
# LINPROBE.md / paper Table 10: LARS, base lr 0.1, no weight decay, effective batch 16384, 90 epochs, 10 warmup;
# RandomResizedCrop + flip only; BatchNorm (no affine) before the linear head; the cls token.
_LINPROBE = dict(mode="linprobe", input_size=224, batch_size=512, effective_batch_size=16384, blr=0.1,
                 weight_decay=0.0, epochs=90, warmup_epochs=10, min_lr=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
                 aa=None, reprob=0.0, drop_path=0.0, global_pool=False)

PRESETS = {
    # IN-1K top-1 83.6 / 85.9 / 86.9 (87.8 for ViT-H at 448)
    "finetune-base": dict(_FINETUNE, model="vit_base_patch16", blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "finetune-large": dict(_FINETUNE, model="vit_large_patch16", blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "finetune-huge": dict(_FINETUNE, model="vit_huge_patch14", blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
    "finetune-huge-448": dict(_FINETUNE, model="vit_huge_patch14", blr=1e-3, layer_decay=0.75, drop_path=0.3,
                              epochs=50, input_size=448, batch_size=8),
    # IN-1K top-1 68.0 / 75.8 / 76.6
    "linprobe-base": dict(_LINPROBE, model="vit_base_patch16"),
    "linprobe-large": dict(_LINPROBE, model="vit_large_patch16"),
    "linprobe-huge": dict(_LINPROBE, model="vit_huge_patch14"),
    # Paper Fig. 9: tuning the last block of ViT-L lifts IN-1K top-1 from 73.5 (linear) to 81.0. The paper picks
    # the best of 50 / 100 / 200 epochs for each number of blocks; fewer blocks want longer schedules.
    "partial-large": dict(_FINETUNE, mode="partial", partial_blocks=1, model="vit_large_patch16", blr=1e-3,
                          layer_decay=0.75, drop_path=0.2, epochs=100),
    # ViT-Tiny at 64 px (16 patches) for a CPU, e.g. on the built-in synthetic world's class folders (6 shapes,
    # 360 training images; python -m mae_transfer.data.synthetic --out data/world) starting from pretrain/'s tiny
    # preset: the fine-tuning recipe with a higher base lr for the short schedule, a few minutes on 2 cores.
    "tiny": dict(_FINETUNE, model="vit_tiny_patch16", input_size=64, batch_size=32, effective_batch_size=None,
                 blr=8e-3, layer_decay=0.75, drop_path=0.1, epochs=60, mixup=0.0, cutmix=0.0, num_workers=2,
                 save_every=20),
    # Its linear probe: the recipe's absolute LARS lr (6.4 = 0.1 x 16384 / 256) at batch 32.
    "tiny-linprobe": dict(_LINPROBE, model="vit_tiny_patch16", input_size=64, batch_size=32,
                          effective_batch_size=None, blr=51.2, epochs=60, warmup_epochs=5, num_workers=2,
                          save_every=20),
}
