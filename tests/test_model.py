"""The autoencoder: shapes, parameter counts, masking, noise, loss, position embeddings, reconstruction."""

import math

import numpy as np
import pytest
import torch

from dmae.models.architectures import ARCHITECTURES
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE, sincos_pos_embed
from dmae.settings import NoiseSettings
from dmae.train.noise import add_noise, keyed_normal, sample_sigma
from tests.conftest import REPO_PARAMS


def tiny(img_size=16, in_chans=1):
    return DenoisingMAE(ModelConfig("tiny", img_size, 4, in_chans, (0.5,) * in_chans, (0.25,) * in_chans))


@pytest.mark.parametrize("preset, encoder_m, total_m", [("base", 85.8, 111.9), ("large", 303.3, 329.5)])
def test_paper_parameter_counts(preset, encoder_m, total_m):
    with torch.device("meta"):
        model = DenoisingMAE(ModelConfig(preset, 224, 16, 3, (0.5,) * 3, (0.25,) * 3))
    counts = {"enc": 0, "all": 0}
    for name, p in model.named_parameters():
        counts["all"] += p.numel()
        counts["enc"] += 0 if name.startswith(("decoder_", "mask_token")) else p.numel()
    assert round(counts["enc"] / 1e6, 1) == encoder_m
    assert round(counts["all"] / 1e6, 1) == total_m


def test_mae_key_names_of_released_checkpoints():
    with torch.device("meta"):
        keys = DenoisingMAE(ModelConfig("base", 224, 16, 3, (0.5,) * 3, (0.25,) * 3)).state_dict()
    assert keys["pos_embed"].shape == (1, 197, 768) and keys["decoder_pos_embed"].shape == (1, 197, 512)
    assert keys["decoder_pred.weight"].shape == (768, 512) and keys["mask_token"].shape == (1, 1, 512)
    assert "blocks.11.attn.qkv.weight" in keys and "decoder_blocks.7.mlp.fc2.bias" in keys
    assert not any("mean" in k or "std" in k for k in keys)  # normalization lives in the JSON config


@pytest.mark.parametrize("preset", list(ARCHITECTURES))
def test_forward_shapes_every_preset(preset):
    patch = 4 if preset == "tiny" else 16
    size = 16 if preset == "tiny" else 32
    with torch.device("meta"):
        model = DenoisingMAE(ModelConfig(preset, size, patch, 3, (0.5,) * 3, (0.25,) * 3))
        x = torch.empty(2, 3, size, size)
        loss, pred, mask = model(x, x, 0.75)
    n = (size // patch) ** 2
    assert pred.shape == (2, n, patch * patch * 3) and mask.shape == (2, n) and loss.shape == ()


def test_masking_exact_count_and_seeded():
    model = tiny()
    x = torch.rand(5, 1, 16, 16)
    for ratio, masked in [(0.75, 12), (0.5, 8), (0.6, 10)]:  # keep int(16 * (1 - ratio)) patches
        torch.manual_seed(0)
        _, _, mask = model(x, x, ratio)
        assert (mask.sum(1) == masked).all()
        torch.manual_seed(0)
        _, _, mask2 = model(x, x, ratio)
        assert torch.equal(mask, mask2)
    _, _, mask = model(x, x, 0.0)
    assert mask.sum() == 0


def test_noise_statistics_unclamped_and_seeded():
    x = torch.full((4, 3, 64, 64), 0.9)
    torch.manual_seed(1)
    noisy = add_noise(x, 0.25)
    eps = (noisy - x) / 0.25
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
    assert noisy.max() > 1.0  # not clamped
    torch.manual_seed(1)
    assert torch.equal(add_noise(x, 0.25), noisy)
    per_image = add_noise(torch.zeros(2, 1, 64, 64), torch.tensor([0.0, 0.5]))
    assert per_image[0].abs().max() == 0 and abs(per_image[1].std().item() - 0.5) < 0.02


def noise(**changes) -> NoiseSettings:
    return NoiseSettings.model_validate({**REPO_PARAMS["pretrain"]["noise"], **changes})


def test_sigma_samplers_have_the_requested_distributions():
    rng = np.random.default_rng(0)
    n = 200_000
    fixed = sample_sigma(noise(dist="fixed", sigma=0.25), n, rng)
    assert torch.all(fixed == 0.25)
    uni = sample_sigma(noise(dist="uniform", low=0, high=150, per255=True), n, rng)
    assert uni.min() >= 0 and uni.max() <= 150 / 255 and abs(uni.mean().item() - 75 / 255) < 1e-3
    assert abs(uni.std().item() - 150 / 255 / math.sqrt(12)) < 1e-3
    gamma = sample_sigma(noise(dist="gamma", shape=25, scale=3, per255=True), n, rng)  # NIM's default
    assert abs(gamma.mean().item() - 75 / 255) < 1e-3 and abs(gamma.std().item() - 15 / 255) < 1e-3
    assert torch.all(sample_sigma(noise(dist="none"), 3, rng) == 0)


def test_keyed_noise_does_not_depend_on_batch_composition():
    a = keyed_normal([1, 2, 3], (1, 4, 4), "cpu")
    b = keyed_normal([3, 9], (1, 4, 4), "cpu")
    assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])


def test_loss_against_hand_computed_tiny_case():
    model = tiny()
    clean = torch.zeros(1, 1, 16, 16)
    clean[0, 0, :4, :4] = torch.arange(16.0).view(4, 4) / 15  # patch 0: a ramp; other patches constant
    pred = torch.zeros(1, 16, 16)
    mask = torch.zeros(1, 16)
    mask[0, 0] = 1
    normed = model.input_adapter(clean)
    # norm_pix targets: patch 0 is standardized (unbiased var, eps 1e-6); constant patches become 0
    p0 = model.patchify(normed)[0, 0]
    t0 = (p0 - p0.mean()) / math.sqrt(p0.var().item() + 1e-6)
    expected_patch0 = (t0**2).mean().item()
    all_loss = model.forward_loss(normed, pred, mask, norm_pix_loss=True, masked_only=False)
    masked_loss = model.forward_loss(normed, pred, mask, norm_pix_loss=True, masked_only=True)
    assert all_loss.item() == pytest.approx(expected_patch0 / 16, rel=1e-5)  # DMAE: mean over all 16 patches
    assert masked_loss.item() == pytest.approx(expected_patch0, rel=1e-5)  # MAE: masked patches only
    raw = model.forward_loss(normed, pred, mask, norm_pix_loss=False, masked_only=False)
    assert raw.item() == pytest.approx((normed**2).mean().item(), rel=1e-5)


def test_sincos_position_embedding_values():
    emb = sincos_pos_embed(8, 2, cls_token=True)
    assert emb.shape == (1, 5, 8)
    assert torch.all(emb[0, 0] == 0)  # cls slot
    # position (row 0, col 0): sin(0)=0 then cos(0)=1 for each axis half
    assert torch.allclose(emb[0, 1], torch.tensor([0, 0, 1, 1, 0, 0, 1, 1.0]))
    # column 1 in the first half: sin(1 * omega_0) with omega_0 = 1
    assert emb[0, 2, 0].item() == pytest.approx(math.sin(1.0))


def test_upsampling_happens_inside_the_model_after_noise():
    model = tiny(img_size=32)
    x = torch.rand(2, 1, 16, 16)
    loss, pred, _ = model(x, add_noise(x, 0.25), 0.75)  # 16x16 inputs, 32x32 model: 64 patches
    assert pred.shape == (2, 64, 16)
    assert model.reconstruct(x).shape == x.shape  # back at the input's size, in [0,1]


def test_reconstruct_uses_only_the_noisy_input():
    model = tiny()
    noisy = torch.rand(3, 1, 16, 16)
    out = model.reconstruct(noisy, sigma=0.25)
    assert out.min() >= 0 and out.max() <= 1
    noisy.requires_grad_(True)
    model.reconstruct(noisy, sigma=0.25).sum().backward()
    assert noisy.grad is not None and noisy.grad.abs().sum() > 0  # differentiable end to end
