"""The masked autoencoder (He et al. 2022), readable in one file.

The encoder is `VisionTransformer` (it sees only the visible ~25% of patches); this class adds the lightweight
decoder, the pixel targets and the loss. It subclasses the encoder rather than wrapping it so that its state dict
has exactly the reference's keys: a released `mae_pretrain_vit_*_full.pth` or `mae_visualize_vit_*.pth` loads
strictly with no renaming, and the encoder part is a plain timm/MAE encoder state dict.
"""
from functools import partial
from typing import Callable, Dict

import torch
from torch import nn
from timm.models.vision_transformer import Block

from .pos_embed import sincos_pos_embed_2d
from .vit import ARCHS, VisionTransformer

__all__ = ["MaskedAutoencoderViT", "DECODER_KEYS", "mae_vit_tiny_patch16", "mae_vit_small_patch16",
           "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]

# Parameters that belong to the decoder; everything else in a full checkpoint is the encoder.
DECODER_KEYS = ("mask_token", "decoder_")


class MaskedAutoencoderViT(VisionTransformer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=False, masking="random", **encoder_kwargs):
        if img_size % patch_size:  # the targets are whole patches; timm would drop the pixels beyond the last
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer,
                         weight_init="skip", **encoder_kwargs)
        self.pos_embed.requires_grad_(False)  # fixed sin-cos, as in the paper
        num_patches = self.patch_embed.num_patches

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_embed.patch_size[0] ** 2 * in_chans)

        self.norm_pix_loss = norm_pix_loss
        self.masking = masking
        self.initialize_weights()

    def initialize_weights(self):
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size))
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv is a linear layer on flattened patches
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_linear_and_norm)

    @staticmethod
    def _init_linear_and_norm(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- pixels <-> patches ------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    # The reference writes these transposes as einsum ('nchpwq->nhwpqc'); CUDA autocast casts einsum to bf16/fp16
    # like a matmul, which would round the loss targets. permute is the same reordering and keeps their dtype.
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch's pixels ordered (p, p, c) as the reference does."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # n h w p q c
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W) on this model's patch grid."""
        p = self.patch_size
        gh, gw = self.grid_size
        c = x.shape[-1] // (p * p)
        x = x.reshape(x.shape[0], gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # n c h p w q
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    # -- the method ----------------------------------------------------------------------------------------------
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        return self.forward_masked(imgs, mask_ratio, noise=noise, masking=self.masking)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        n, num_visible = x.shape[0], x.shape[1] - 1
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] - num_visible, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def encoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder's weights in the reference's encoder-only layout (mae_pretrain_vit_*.pth)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_KEYS)}


# Decoder sizes: the reference uses 512 x 8 blocks for B/L/H; the CPU sizes get proportionally lighter decoders.
DECODERS = {
    "tiny": dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "small": dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "base": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def _builder(arch: str, patch_size: int) -> Callable[..., MaskedAutoencoderViT]:
    def build(**kwargs) -> MaskedAutoencoderViT:
        return MaskedAutoencoderViT(**{**ARCHS[arch], **DECODERS[arch], "patch_size": patch_size, **kwargs})

    build.__name__ = f"mae_vit_{arch}_patch{patch_size}"
    build.__doc__ = f"MAE ViT-{arch} /{patch_size}: encoder {ARCHS[arch]}, decoder {DECODERS[arch]}; kwargs override."
    return build


mae_vit_tiny_patch16 = _builder("tiny", 16)
mae_vit_small_patch16 = _builder("small", 16)
mae_vit_base_patch16 = _builder("base", 16)
mae_vit_large_patch16 = _builder("large", 16)
mae_vit_huge_patch14 = _builder("huge", 14)
