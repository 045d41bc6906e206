"""Analytic FLOP counts of the ViTs: one multiply-add is 2 FLOPs; norms, activations and softmax are left out.

Per image, forward, with P patches of p x p x C pixels, T = P + 1 tokens (the cls token), width D, MLP width
M = mlp_ratio * D and K classes:

    patch embedding     2 * P * (C * p^2) * D
    each block          2 * T * (4 * D^2 + 2 * D * M)     qkv (3 D^2) + projection (D^2) + the two MLP layers
                        + 2 * 2 * T^2 * D                  attention: Q K^T and (softmax) V
    head                2 * D * K

A training step costs 3x its forward (the backward pass is about twice the forward).
"""

from __future__ import annotations

from dmae.models.architectures import ModelConfig

TRAIN_FACTOR = 3


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One transformer block over `tokens` tokens of width `dim`."""
    mlp_dim = int(dim * mlp_ratio)
    return 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * 2 * tokens * tokens * dim


def patch_embed_flops(cfg: ModelConfig, dim: int) -> int:
    return 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * dim


def classifier_flops(cfg: ModelConfig, num_classes: int) -> int:
    """Forward FLOPs of the base classifier (dmae.classifier.Classifier) on one image."""
    a = cfg.arch
    tokens = cfg.num_patches + 1
    return (patch_embed_flops(cfg, a.embed_dim) + a.depth * block_flops(tokens, a.embed_dim, a.mlp_ratio)
            + 2 * a.embed_dim * num_classes)


def autoencoder_flops(cfg: ModelConfig, mask_ratio: float) -> int:
    """Forward FLOPs of the pretraining autoencoder (dmae.model.DenoisingMAE) on one image.

    The encoder sees the kept patches and the cls token; the decoder embeds them, then runs on all P + 1
    tokens and predicts every patch's pixels.
    """
    a = cfg.arch
    patches = cfg.num_patches
    encoder_tokens = int(patches * (1 - mask_ratio)) + 1
    pixels = cfg.in_chans * cfg.patch_size**2
    return (patch_embed_flops(cfg, a.embed_dim)
            + a.depth * block_flops(encoder_tokens, a.embed_dim, a.mlp_ratio)
            + 2 * encoder_tokens * a.embed_dim * a.decoder_embed_dim
            + a.decoder_depth * block_flops(patches + 1, a.decoder_embed_dim, a.mlp_ratio)
            + 2 * (patches + 1) * a.decoder_embed_dim * pixels)
