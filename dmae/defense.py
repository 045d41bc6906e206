"""De^3 (NIM paper): noise the input, denoise it with a frozen pretrained autoencoder, classify the result.

`Defense` is the whole chain as one differentiable module, so a white-box attack differentiates through the
noise draw, the denoiser and the classifier alike. The test-time noise level sigma trades clean accuracy for
robustness; sigma 0 means no defense: the classifier alone sees the input.

Per-patch normalized targets. A model pretrained with `norm_pix_loss` predicts every patch up to its mean and
standard deviation, which must come from somewhere at test time. The NIM reference code takes them from the
clean image, which a defense cannot see (and which hands the attacker a path around the denoiser). Here they
come from the noisy input the denoiser is given (`DenoisingMAE.pred_to_image`): the patch mean as it is (noise
has zero mean) and the patch variance minus the known noise variance sigma^2. Effect: the denoiser restores the
structure inside each patch, while each patch's mean passes through from the input, averaged over the patch's
p*p*C pixels. Noise in it shrinks by that averaging but is not removed (visible as blockiness at high sigma),
and an attacker's perturbation of a patch's mean reaches the classifier undenoised.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from dmae.checkpoint import load_config, load_into, load_weights
from dmae.errors import UserError
from dmae.model import DenoisingMAE, ModelConfig
from dmae.noise import add_noise

InputMode = Literal["clean", "noisy", "denoised"]


def freeze(model: DenoisingMAE) -> DenoisingMAE:
    """Eval mode and no parameter gradients: a denoiser is never trained by what uses it."""
    return model.eval().requires_grad_(False)


def load_denoiser(ckpt_dir, expect_cfg: ModelConfig) -> DenoisingMAE:
    """A pretrained autoencoder from `ckpt_dir` (written by `dmae pretrain`), frozen."""
    config = load_config(ckpt_dir)
    if config.get("kind") != "autoencoder":
        raise UserError(f"{ckpt_dir}: not a pretrained autoencoder (kind={config.get('kind')!r})")
    cfg = ModelConfig.from_dict(config)
    if cfg != expect_cfg:
        raise UserError(f"{ckpt_dir}: autoencoder was built for {cfg}, params ask for {expect_cfg}")
    model = DenoisingMAE(cfg)
    load_into(model, load_weights(ckpt_dir), source=str(ckpt_dir))
    return freeze(model)


class Defense(nn.Module):
    """x -> x + N(0, sigma^2) -> denoiser reconstruction (whole image, clamped to [0,1]) -> classifier logits.

    One noise draw per forward pass, from torch's global RNG (the caller seeds it). The denoiser stays frozen
    and in eval mode whatever mode the module is put in.
    """

    def __init__(self, denoiser: DenoisingMAE | None, classifier: nn.Module, sigma: float,
                 norm_pix_loss: bool = True):
        super().__init__()
        if sigma < 0:
            raise UserError(f"the defense's sigma must be >= 0, got {sigma}")
        if sigma > 0 and denoiser is None:
            raise UserError("a defense with sigma > 0 needs a denoiser")
        self.denoiser = freeze(denoiser) if denoiser is not None else None
        self.classifier = classifier
        self.sigma, self.norm_pix_loss = float(sigma), norm_pix_loss

    def train(self, mode: bool = True) -> "Defense":
        super().train(mode)
        if self.denoiser is not None:
            self.denoiser.eval()
        return self

    def purify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, denoised): the noised input (unclamped) and what the classifier sees."""
        noisy = add_noise(x, self.sigma)
        return noisy, self.denoiser.reconstruct(noisy, self.norm_pix_loss, self.sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return self.classifier(x)
        return self.classifier(self.purify(x)[1])


class TrainingInputs:
    """What a De^3 classifier sees while it is fine-tuned, from a batch of clean images.

    'clean': the images; 'noisy': image i noised at its own level sigma_max * u_i (so sigma ~ U(0, sigma_max));
    'denoised': those noisy images denoised by the frozen denoiser (no gradient).
    """

    def __init__(self, mode: InputMode, sigma_max: float, denoiser: DenoisingMAE | None = None,
                 norm_pix_loss: bool = True):
        if mode == "denoised" and denoiser is None:
            raise UserError("input mode 'denoised' needs a denoiser")
        self.mode, self.sigma_max, self.norm_pix_loss = mode, sigma_max, norm_pix_loss
        self.denoiser = freeze(denoiser) if mode == "denoised" else None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x: clean [B, C, H, W]; eps: standard normal noise like x; u: uniform [B] in [0, 1)."""
        if self.mode == "clean":
            return x
        sigma = self.sigma_max * u.to(x.device)
        noisy = add_noise(x, sigma, eps=eps)
        if self.mode == "noisy":
            return noisy
        return self.denoiser.reconstruct(noisy, self.norm_pix_loss, sigma)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The inputs of x with noise and levels drawn from `generator` (on x's device)."""
        eps = torch.randn(x.shape, device=x.device, generator=generator)
        return self(x, eps, torch.rand(x.shape[0], device=x.device, generator=generator))


def keyed_uniform(keys: list[int]) -> torch.Tensor:
    """One U[0,1) draw per key, from a generator seeded with it: [len(keys)] on the CPU."""
    return torch.tensor([np.random.default_rng(k).random() for k in keys], dtype=torch.float32)
