"""The base classifier: the pretrained encoder as a timm VisionTransformer, normalization inside.

Full fine-tuning uses global average pooling + fc_norm (the pretrained final norm is dropped) and a head
initialised with std 2e-5; the linear probe keeps the cls token and final norm, freezes the encoder and trains
BatchNorm1d(affine=False) + Linear, as in MAE.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import InputAdapter
from dmae.models.checkpoint import load_config, load_into, load_weights
from dmae.util.errors import UserError

Mode = Literal["full", "linear_probe"]


class Classifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, mode: Mode = "full", drop_path: float = 0.0):
        super().__init__()
        self.cfg, self.num_classes, self.mode = cfg, num_classes, mode
        a = cfg.arch
        self.input_adapter = InputAdapter(cfg.img_size, cfg.mean, cfg.std)
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=num_classes,
            embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path,
            global_pool="avg" if mode == "full" else "token", fc_norm=mode == "full")
        if mode == "full":
            nn.init.trunc_normal_(self.vit.head.weight, std=2e-5)
        else:
            linear = nn.Linear(a.embed_dim, num_classes)
            nn.init.trunc_normal_(linear.weight, std=0.01)
            self.vit.head = nn.Sequential(nn.BatchNorm1d(a.embed_dim, affine=False, eps=1e-6), linear)
        nn.init.zeros_(self._head_linear().bias)

    def _head_linear(self) -> nn.Linear:
        return self.vit.head if isinstance(self.vit.head, nn.Linear) else self.vit.head[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in [0,1] (noise already added by the caller) -> logits."""
        return self.vit(self.input_adapter(x))

    def load_encoder(self, encoder: dict[str, torch.Tensor], source: str) -> None:
        """Load MAE-named encoder weights (cls_token, pos_embed, patch_embed, blocks, norm)."""
        state = {f"vit.{k}": v for k, v in encoder.items()}
        if self.mode == "full":
            state = {k: v for k, v in state.items() if not k.startswith("vit.norm.")}
        load_into(self, state, source, allow_missing=("vit.head", "vit.fc_norm"))
        if self.mode == "linear_probe":
            for name, p in self.named_parameters():
                p.requires_grad = name.startswith("vit.head")

    def config(self) -> dict:
        return {"kind": "classifier", "mode": self.mode, "num_classes": self.num_classes, **self.cfg.to_dict()}


def load_classifier(ckpt_dir, expect_classes: int | None = None, expect_cfg: ModelConfig | None = None) -> Classifier:
    """A fine-tuned classifier from `ckpt_dir`, checked against what the caller expects."""
    config = load_config(ckpt_dir)
    if config.get("kind") != "classifier":
        raise UserError(f"{ckpt_dir}: not a fine-tuned classifier (kind={config.get('kind')!r})")
    try:
        cfg = ModelConfig.from_dict(config)
    except UserError as exc:
        raise UserError(f"{ckpt_dir}: {exc}") from None
    missing = sorted({"num_classes", "mode"} - config.keys())
    if missing:
        raise UserError(f"{ckpt_dir}: classifier config lacks {missing}")
    if expect_classes is not None and config["num_classes"] != expect_classes:
        raise UserError(f"{ckpt_dir}: classifier has {config['num_classes']} classes, the data set "
                        f"{expect_classes}")
    if expect_cfg is not None and cfg != expect_cfg:
        raise UserError(f"{ckpt_dir}: classifier was built for {cfg}, params ask for {expect_cfg}")
    model = Classifier(cfg, config["num_classes"], config["mode"])
    load_into(model, load_weights(ckpt_dir), source=str(ckpt_dir))
    return model
