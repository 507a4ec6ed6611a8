"""Named flag sets for main_pretrain.py: the paper's documented recipes, and one that runs on a laptop CPU.

The reference's argparse defaults are not its documented recipe (blr 1e-3, 400 epochs, norm_pix_loss off, batch 4);
a preset sets the documented values as defaults, and any flag given on the command line still wins:

    python pretrain/main_pretrain.py --preset large-800 --data_path /datasets/imagenet

The recipe's effective batch of 4096 is reached by gradient accumulation on however many GPUs there are:
accum_iter = 4096 / (batch_size * GPUs), e.g. 8 on 8 GPUs with batch_size 64.
"""

# PRETRAIN.md of the MAE reference: AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 at effective batch 4096,
# 40 warmup epochs then cosine, mask ratio 0.75, normalized-pixel targets, 224 px.
_PAPER = dict(input_size=224, mask_ratio=0.75, norm_pix_loss=True, weight_decay=0.05, blr=1.5e-4, min_lr=0.0,
              warmup_epochs=40, batch_size=64, effective_batch_size=4096, masking="random")

_MODELS = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16", "huge": "mae_vit_huge_patch14"}

PRESETS = {f"{size}-{epochs}": dict(_PAPER, model=model, epochs=epochs)
           for size, model in _MODELS.items() for epochs in (800, 1600)}

# A ViT-Tiny on 64 px images (16 patches, 4 visible): minutes on 2 CPU cores over a few thousand small images, e.g.
# the built-in synthetic world (python -m mae_transfer.data.synthetic --out data/world --size small).
# A higher base lr than the paper's suits the short schedule.
PRESETS["tiny"] = dict(input_size=64, mask_ratio=0.75, norm_pix_loss=True, weight_decay=0.05, blr=1.5e-3,
                       min_lr=0.0, warmup_epochs=2, batch_size=64, epochs=20, masking="random",
                       model="mae_vit_tiny_patch16", num_workers=2, save_every=5)
