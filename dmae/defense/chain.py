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

import torch
from torch import nn

from dmae.models.autoencoder import DenoisingMAE
from dmae.train.noise import add_noise, keyed_normal, keyed_uniform
from dmae.util.errors import UserError

InputMode = Literal["clean", "noisy", "denoised"]


def freeze(model: DenoisingMAE) -> DenoisingMAE:
    """Eval mode and no parameter gradients: a denoiser is never trained by what uses it."""
    return model.eval().requires_grad_(False)


class Defense(nn.Module):
    """x -> x + N(0, sigma^2) -> denoiser reconstruction (whole image, clamped to [0,1]) -> classifier logits.

    `norm_pix_loss` and `groups` say how the denoiser turns its output into an image (DenoisingMAE.reconstruct;
    the denoiser's settings give both: PretrainSettings.norm_pix_loss, .reconstruct_groups).

    One noise draw per forward pass, from torch's global RNG (the caller seeds it). The denoiser stays frozen
    and in eval mode whatever mode the module is put in.
    """

    def __init__(self, denoiser: DenoisingMAE | None, classifier: nn.Module, sigma: float,
                 norm_pix_loss: bool = True, groups: int = 1):
        super().__init__()
        if sigma < 0:
            raise UserError(f"the defense's sigma must be >= 0, got {sigma}")
        if sigma > 0 and denoiser is None:
            raise UserError("a defense with sigma > 0 needs a denoiser")
        self.denoiser = freeze(denoiser) if denoiser is not None else None
        self.classifier = classifier
        self.sigma, self.norm_pix_loss, self.groups = float(sigma), norm_pix_loss, groups

    def train(self, mode: bool = True) -> "Defense":
        super().train(mode)
        if self.denoiser is not None:
            self.denoiser.eval()
        return self

    def purify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy, denoised): the noised input (unclamped) and what the classifier sees."""
        noisy = add_noise(x, self.sigma)
        return noisy, self.denoiser.reconstruct(noisy, self.norm_pix_loss, self.sigma, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return self.classifier(x)
        return self.classifier(self.purify(x)[1])


class StraightThrough(nn.Module):
    """A defense whose denoiser is skipped on the backward pass (BPDA, Athalye et al. 2018): the forward pass is
    the defense's; the gradient treats the denoiser as the identity, so an attack sees the classifier's gradient
    at the denoised image. A second white-box route, for when the denoiser's own gradient is uninformative."""

    def __init__(self, defense: Defense):
        super().__init__()
        if defense.denoiser is None:
            raise UserError("BPDA needs a defense with a denoiser")
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.defense
        noisy = add_noise(x, d.sigma)
        with torch.no_grad():
            denoised = d.denoiser.reconstruct(noisy, d.norm_pix_loss, d.sigma, d.groups)
        return d.classifier(noisy + (denoised - noisy).detach())


class Denoised(nn.Module):
    """The base classifier of denoised smoothing: an input that is noisy already (Smooth adds the noise) ->
    one-step reconstruction by the frozen denoiser at the known noise level sigma -> classifier logits.

    A pure function of its input: no noise of its own, no masking, the denoiser frozen in eval mode.
    """

    def __init__(self, denoiser: DenoisingMAE, classifier: nn.Module, sigma: float, norm_pix_loss: bool = True,
                 groups: int = 1):
        super().__init__()
        self.denoiser, self.classifier = freeze(denoiser), classifier
        self.sigma, self.norm_pix_loss, self.groups = float(sigma), norm_pix_loss, groups

    def train(self, mode: bool = True) -> "Denoised":
        super().train(mode)
        self.denoiser.eval()
        return self

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser.reconstruct(noisy, self.norm_pix_loss, self.sigma, self.groups))


class DefenseInputs:
    """What a De^3 classifier is fine-tuned on (dmae.train.finetune.Inputs), from a batch of clean images.

    'clean': the images; 'noisy': image i noised at its own level sigma_max * u_i (so sigma ~ U(0, sigma_max)),
    or at sigma_max itself when `fixed` (the classifier of denoised smoothing at one sigma); 'denoised': those
    noisy images denoised by the frozen denoiser (no gradient). One view per image.
    """

    copies = 1

    def __init__(self, mode: InputMode, sigma_max: float, denoiser: DenoisingMAE | None = None,
                 norm_pix_loss: bool = True, fixed: bool = False, groups: int = 1):
        if mode == "denoised" and denoiser is None:
            raise UserError("input mode 'denoised' needs a denoiser")
        self.mode, self.sigma, self.norm_pix_loss, self.fixed = mode, sigma_max, norm_pix_loss, fixed
        self.groups = groups
        self.label = f"{mode}, σ = {sigma_max:.4g}" if fixed else f"{mode}, σ ~ U(0, {sigma_max:.4g})"
        self.denoiser = freeze(denoiser) if mode == "denoised" else None

    @torch.no_grad()
    def view(self, x: torch.Tensor, eps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x: clean [B, C, H, W]; eps: standard normal noise like x; u: uniform [B] in [0, 1)."""
        if self.mode == "clean":
            return x
        sigma = self.sigma if self.fixed else self.sigma * u.to(x.device)
        noisy = add_noise(x, sigma, eps=eps)
        if self.mode == "noisy":
            return noisy
        return self.denoiser.reconstruct(noisy, self.norm_pix_loss, sigma, self.groups)

    def __call__(self, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
        return self.view(x, keyed_normal(keys, x.shape[1:], x.device), keyed_uniform(keys)).unsqueeze(0)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(x.shape, device=x.device, generator=generator)
        return self.view(x, eps, torch.rand(x.shape[0], device=x.device, generator=generator))
