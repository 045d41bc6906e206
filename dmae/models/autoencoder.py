"""The denoising masked autoencoder (DMAE; with mask_ratio 0 it is NIM, without noise it is MAE).

Parameter names follow facebookresearch/mae (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.*`, `norm`,
`mask_token`, `decoder_*`), so released DMAE/MAE checkpoints load without renaming.

Forward order (REFERENCE.md): the caller adds noise to [0,1] images (unclamped); here both the clean and the noisy
image are upsampled when smaller than the model input, then normalized; the encoder sees the visible patches of
the noisy image; the decoder predicts every patch; the loss compares with the clean image.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from dmae.models.architectures import ModelConfig
from dmae.models.checkpoint import load_config, load_into, load_weights
from dmae.util.errors import UserError


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [1, grid*grid (+1), dim], as in MAE (zeros for the cls slot)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.tensor(emb, dtype=torch.float32).unsqueeze(0)


class InputAdapter(nn.Module):
    """First operation of every model: upsample to the model input when smaller, then normalize.

    Mean and std are non-persistent buffers: they live in the JSON config, not in the weights, so checkpoint keys
    stay those of the released models.
    """

    def __init__(self, img_size: int, mean, std):
        super().__init__()
        self.img_size = img_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.resize(x) - self.mean) / self.std


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class DenoisingMAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        a, p = cfg.arch, cfg.patch_size
        grid = cfg.img_size // p
        self.input_adapter = InputAdapter(cfg.img_size, cfg.mean, cfg.std)

        self.patch_embed = PatchEmbed(cfg.img_size, p, cfg.in_chans, a.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(a.embed_dim, grid, True), requires_grad=False)
        self.blocks = _blocks(a.embed_dim, a.depth, a.num_heads, a.mlp_ratio)
        self.norm = nn.LayerNorm(a.embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(a.embed_dim, a.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, a.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(a.decoder_embed_dim, grid, True),
                                              requires_grad=False)
        self.decoder_blocks = _blocks(a.decoder_embed_dim, a.decoder_depth, a.decoder_num_heads, a.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(a.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(a.decoder_embed_dim, p * p * cfg.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- patches ------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] (pixel order inside a patch: row, column, channel, as MAE)."""
        p, c = self.cfg.patch_size, self.cfg.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, c = self.cfg.patch_size, self.cfg.in_chans
        g = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep the (1 - mask_ratio) share of patches with the lowest `noise` (uniform [B, L]; drawn here if not
        given) per sample; mask is 1 where a patch is removed."""
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        shuffle = torch.argsort(noise.to(x.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        ids_keep = shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        return x_kept, torch.gather(mask, 1, restore), restore

    # -- encoder / decoder --------------------------------------------------------------------------------
    def forward_encoder(self, x: torch.Tensor, mask_ratio: float, mask_noise: torch.Tensor | None = None):
        """x: normalized model-size images."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        if mask_ratio > 0:
            x, mask, restore = self.random_masking(x, mask_ratio, mask_noise)
        else:
            mask = torch.zeros(x.shape[0], x.shape[1], device=x.device)
            restore = None
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor | None) -> torch.Tensor:
        x = self.decoder_embed(x)
        if restore is not None:
            b, n_patches = restore.shape
            fill = self.mask_token.expand(b, n_patches + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:, :], fill], dim=1)
            x_ = torch.gather(x_, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, clean: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *,
                     norm_pix_loss: bool, masked_only: bool) -> torch.Tensor:
        """MSE against the clean (normalized) image; per-patch normalized targets when norm_pix_loss."""
        target = self.patchify(clean)
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        if masked_only:
            return (per_patch * mask).sum() / mask.sum()
        return per_patch.mean()

    def forward(self, clean: torch.Tensor, noisy: torch.Tensor, mask_ratio: float, *,
                norm_pix_loss: bool = True, masked_only: bool = False, mask_noise: torch.Tensor | None = None):
        """Pretraining step. clean, noisy: [0,1]-space images (noisy unclamped); mask_noise: optional uniform
        [B, L] deciding which patches are kept. Returns (loss, pred, mask)."""
        clean_n = self.input_adapter(clean)
        latent, mask, restore = self.forward_encoder(self.input_adapter(noisy), mask_ratio, mask_noise)
        pred = self.forward_decoder(latent, restore)
        loss = self.forward_loss(clean_n, pred, mask, norm_pix_loss=norm_pix_loss, masked_only=masked_only)
        return loss, pred, mask

    def pred_to_image(self, pred: torch.Tensor, seen: torch.Tensor, norm_pix_loss: bool,
                      sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Turn decoder output into an image in [0,1] units at the model's resolution (not clamped).

        With per-patch normalized targets the patch mean and std must come from somewhere. We take them from
        `seen`, the noisy image the model was given, never from the clean image (which a defense cannot see, and
        which the NIM reference code uses). Noise of known level sigma adds about (sigma/std)^2 to each patch's
        variance, so that share is subtracted before the square root; the mean is unbiased as it is.
        """
        pred = pred.float()
        if norm_pix_loss:
            patches = self.patchify(self.input_adapter(seen).float())
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=pred.device).reshape(-1, 1, 1)
            noise_var = sigma**2 * (1.0 / self.input_adapter.std.float() ** 2).mean()
            var = (patches.var(dim=-1, keepdim=True) - noise_var).clamp_min(0)
            pred = pred * (var + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
        img = self.unpatchify(pred)
        return img * self.input_adapter.std + self.input_adapter.mean

    def reconstruct(self, noisy: torch.Tensor, norm_pix_loss: bool = True, sigma: float | torch.Tensor = 0.0,
                    groups: int = 1) -> torch.Tensor:
        """Denoise a whole image: noisy [0,1]-space input at noise level sigma -> [0,1] image at the input's size.

        groups = 1: one pass without masking (DMAE, NIM). groups = k > 1: MAE's own task, for a model trained to
        predict masked patches only: k passes over a fixed partition of the patches (patch i in group i mod k),
        pass j seeing group j alone; each patch's prediction is the mean over the k - 1 passes that masked it.
        """
        x = self.input_adapter(noisy)
        if groups == 1:
            latent, _, _ = self.forward_encoder(x, 0.0)
            pred = self.forward_decoder(latent, None)
        else:
            pred = self._complementary_prediction(x, groups)
        img = self.pred_to_image(pred, noisy, norm_pix_loss, sigma)
        if img.shape[-2:] != noisy.shape[-2:]:
            img = F.interpolate(img, size=noisy.shape[-2:], mode="bicubic", align_corners=False)
        return img.clamp(0, 1)

    def _complementary_prediction(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        n_patches = self.patch_embed.num_patches
        if not 2 <= groups <= n_patches:
            raise ValueError(f"groups must be in 2..{n_patches} (the patches), got {groups}")
        index = torch.arange(n_patches, device=x.device)
        total = count = 0
        for j in range(groups):
            visible = index % groups == j
            # lowest noise = kept; a ratio half a patch short of the exact share keeps exactly the group
            noise = (~visible).float() + index / (2 * n_patches)
            ratio = (n_patches - int(visible.sum()) - 0.5) / n_patches
            latent, mask, restore = self.forward_encoder(x, ratio, noise.expand(x.shape[0], -1))
            pred = self.forward_decoder(latent, restore).float()
            total = total + pred * mask.unsqueeze(-1)
            count = count + mask.unsqueeze(-1)
        return total / count


def encoder_state_dict_from(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights of an autoencoder state dict, under MAE names (decoder and mask token dropped)."""
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}


def load_autoencoder(ckpt_dir, expect_cfg: ModelConfig) -> DenoisingMAE:
    """A pretrained autoencoder from `ckpt_dir` (written by `dmae pretrain`), in eval mode, checked against the
    config the caller expects."""
    config = load_config(ckpt_dir)
    if config.get("kind") != "autoencoder":
        raise UserError(f"{ckpt_dir}: not a pretrained autoencoder (kind={config.get('kind')!r})")
    cfg = ModelConfig.from_dict(config)
    if cfg != expect_cfg:
        raise UserError(f"{ckpt_dir}: autoencoder was built for {cfg}, params ask for {expect_cfg}")
    model = DenoisingMAE(cfg)
    load_into(model, load_weights(ckpt_dir), source=str(ckpt_dir))
    return model.eval()
