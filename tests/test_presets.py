"""The paper presets under presets/: valid, complete, the paper's numbers, the right architectures, the CIFAR-10
input path (noise at 32x32, then bicubic upsampling to 224 inside the model), and `dmae use-preset`."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from dmae.data import cifar10, imagenet
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.settings import AugmentSettings, Params, load_params
from dmae.train.noise import add_noise
from stages.cli import app
from tests.conftest import params_with

PRESETS = Path(__file__).resolve().parents[1] / "presets"
NAMES = ["imagenet-dmae-vit-b", "imagenet-dmae-vit-l", "imagenet-dmae-vit-b-released",
         "imagenet-dmae-vit-l-released", "cifar10-dmae-vit-b", "imagenet-nim-vit-b"]
IMAGENET_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
META = {"imagenet": {"channels": 3, "mean": imagenet.MEAN, "std": imagenet.STD},
        "cifar10": {"channels": 3, "mean": cifar10.MEAN, "std": cifar10.STD}}

# Augmentation, as read in the reference code: MAE's main_pretrain.py (RandomResizedCrop scale 0.2-1 + flip);
# DMAE's main_finetune.py / util/datasets.py (timm's create_transform with RandAugment rand-m9-mstd0.5-inc1 and
# its default crop, but only its first two stages: erasing never runs); NIM's util/mae_dataset.py (the same
# plus erasing 0.25, pixel mode, 1 box); DMAE's CIFAR-10 scripts (flip only).
RRC = {"crop_ratio": (0.75, 4 / 3), "hflip": 0.5, "rand_augment": None, "erase_prob": 0.0, "erase_mode": "const",
       "erase_count": 1}
MAE_PRETRAIN_AUGMENT = AugmentSettings(**RRC, crop_scale=(0.2, 1.0))
MAE_FINETUNE_AUGMENT = AugmentSettings(**{**RRC, "crop_scale": (0.08, 1.0), "rand_augment": "rand-m9-mstd0.5-inc1",
                                          "erase_mode": "pixel"})
NIM_FINETUNE_AUGMENT = MAE_FINETUNE_AUGMENT.model_copy(update={"erase_prob": 0.25})
FLIP_ONLY = AugmentSettings(**{**RRC, "crop_scale": None, "crop_ratio": None})

# REFERENCE.md section 1 (and section 2 for NIM pretraining), as dotted params keys.
DMAE_PRETRAIN = {"pretrain.task": "dmae", "pretrain.mask_ratio": 0.75, "pretrain.noise.dist": "fixed",
                 "pretrain.noise.sigma": 0.25, "pretrain.norm_pix_loss": True, "pretrain.batch_size": 4096,
                 "pretrain.base_lr": 1.5e-4, "pretrain.weight_decay": 0.05, "pretrain.warmup_epochs": 40,
                 "pretrain.augment": MAE_PRETRAIN_AUGMENT, "pretrain.precision": "bf16"}
VIT_B_FINETUNE = {"finetune.epochs": 100, "finetune.batch_size": 1024, "finetune.base_lr": 5e-4,
                  "finetune.layer_decay": 0.65, "finetune.weight_decay": 0.05, "finetune.drop_path": 0.1,
                  "finetune.mixup": 0.8, "finetune.cutmix": 1.0, "finetune.label_smoothing": 0.1,
                  "finetune.warmup_epochs": 5, "finetune.min_lr": 1e-6, "finetune.augment": MAE_FINETUNE_AUGMENT}
CONSISTENCY = {"finetune.consistency.enabled": True, "finetune.consistency.m": 2, "finetune.consistency.lam": 2.0,
               "finetune.consistency.eta": {0.25: 0.5, 0.5: 0.5, 1.0: 0.1}}
IMAGENET_CERTIFY = {"data.dataset": "imagenet", "data.image_size": 224, "data.val_fraction": 0.0,
                    "data.test_every": 1, "certify.test_every": 50, "model.img_size": 224, "model.patch_size": 16,
                    "sigmas": [0.25, 0.5, 1.0], "certify.n0": 100, "certify.n": 10_000, "certify.alpha": 0.001,
                    "report.radii": IMAGENET_RADII}
ATTACK = {"attack.eps": 4 / 255, "attack.test_sigmas": [0.0, 70 / 255, 140 / 255], "attack.pgd.steps": 10,
          "attack.pgd.step_size": 2 / 255, "attack.pgd.random_start": True, "attack.square.queries": 5000,
          "attack.autoattack.versions": ["standard", "rand"], "defense.train_sigma_max": 30 / 255}
IMAGENET_ATTACK = {**ATTACK, "attack.examples": "all", "attack.autoattack.examples": 5000}  # all 50,000 val images
EXPECTED = {
    "imagenet-dmae-vit-b": {**DMAE_PRETRAIN, **VIT_B_FINETUNE, **CONSISTENCY, **IMAGENET_CERTIFY, **IMAGENET_ATTACK,
                            "model.preset": "base", "pretrain.epochs": 1100, "pretrain.init_from": None},
    "imagenet-dmae-vit-l": {**DMAE_PRETRAIN, **VIT_B_FINETUNE, **CONSISTENCY, **IMAGENET_CERTIFY, **IMAGENET_ATTACK,
                            "model.preset": "large", "pretrain.epochs": 1600, "pretrain.init_from": None,
                            "finetune.epochs": 50, "finetune.base_lr": 1e-3, "finetune.layer_decay": 0.75,
                            "finetune.drop_path": 0.2},
    "cifar10-dmae-vit-b": {"data.dataset": "cifar10", "data.image_size": 32, "data.val_fraction": 0.0,
                           "data.test_every": 1, "certify.test_every": 1,
                           "model.preset": "base", "model.img_size": 224, "model.patch_size": 16,
                           "pretrain.task": "dmae", "pretrain.mask_ratio": 0.75, "pretrain.noise.sigma": 0.25,
                           "pretrain.init_from": "models/imported/dmae-vit-b", "pretrain.epochs": 50,
                           "pretrain.warmup_epochs": 10, "pretrain.base_lr": 5e-5, "pretrain.batch_size": 512,
                           "pretrain.augment": FLIP_ONLY, "finetune.epochs": 50, "finetune.batch_size": 256,
                           "finetune.base_lr": 5e-4, "finetune.layer_decay": 0.65, "finetune.drop_path": 0.1,
                           "finetune.augment": FLIP_ONLY, "finetune.label_smoothing": 0.1, **CONSISTENCY,
                           "certify.n0": 100, "certify.n": 100_000, "certify.alpha": 0.001,
                           "sigmas": [0.25, 0.5, 1.0], "report.radii": [0.0, 0.25, 0.5, 0.75, 1.0], **ATTACK},
    "imagenet-nim-vit-b": {**IMAGENET_CERTIFY, **IMAGENET_ATTACK, "pretrain.augment": MAE_PRETRAIN_AUGMENT,
                           "finetune.augment": MAE_FINETUNE_AUGMENT},
}
# NIM (REFERENCE.md section 2): the pretraining of the NIM denoiser and the De^3 classifiers' fine-tuning.
NIM_PRETRAIN = {"task": "nim", "mask_ratio": 0.0, "noise.dist": "gamma", "noise.shape": 25.0, "noise.scale": 3.0,
                "noise.per255": True, "epochs": 800, "batch_size": 4096, "base_lr": 1.5e-4, "weight_decay": 0.05,
                "warmup_epochs": 40, "augment": MAE_PRETRAIN_AUGMENT, "init_from": None}
NIM_FINETUNE = {"epochs": 100, "base_lr": 1e-3, "layer_decay": 0.75, "drop_path": 0.1, "mixup": 0.8, "cutmix": 1.0,
                "label_smoothing": 0.1, "consistency.enabled": False, "augment": NIM_FINETUNE_AUGMENT}


def _raw(name: str) -> dict:
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


def _get(params, dotted: str):
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _unset(model: type[BaseModel], raw: dict, prefix: str = "") -> list[str]:
    """Settings keys the file leaves to code defaults (unknown keys are already refused by validation)."""
    missing = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if name not in raw:
            missing.append(prefix + name)
        elif isinstance(sub, type) and issubclass(sub, BaseModel):
            missing += _unset(sub, raw[name], f"{prefix}{name}.")
    return missing


def test_every_preset_is_there():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(NAMES + ["digits-full"])


# The default's former sizes (docs/benchmarks.md): the keys resizing changed, and nothing else.
DIGITS_FULL = {"finetune.epochs": {0.25: 20, 0.5: 30, 1.0: 60}, "finetune.warmup_epochs": 3, "finetune.base_lr": 3e-3,
               "certify.test_every": 1, "certify.precision": "fp32", "certify.method": "cohen", "certify.n_max": 10000,
               "defense.finetune.epochs": 10,
               "defense.finetune.warmup_epochs": 2, "attack.examples": 64, "attack.autoattack.examples": 16,
               "attack.test_sigmas": [0.0, 0.1372549, 0.2745098, 0.5490196],
               "denoised_smoothing.finetune.encoder": "wide",
               **{f"defense.denoisers.{name}.{key}": value for name in ("nim", "mae", "wide")
                  for key, value in (("epochs", 20), ("warmup_epochs", 2))}}


def _flat(raw: dict, prefix: str = "") -> dict:
    return {k: v for key, value in raw.items() for k, v in
            (_flat(value, f"{prefix}{key}.").items() if isinstance(value, dict) and key != "epochs"
             else [(prefix + str(key), value)])}


def test_digits_full_is_the_default_at_its_former_sizes():
    full = _flat(yaml.safe_load((PRESETS / "digits-full.yaml").read_text(encoding="utf-8")))
    default = _flat(yaml.safe_load((PRESETS.parent / "params.yaml").read_text(encoding="utf-8")))
    assert full.keys() == default.keys()
    assert {k: v for k, v in full.items() if v != default[k]} == DIGITS_FULL
    load_params(PRESETS / "digits-full.yaml")


@pytest.mark.parametrize("name", NAMES)
def test_preset_validates_and_sets_every_key(name):
    """A preset is a complete params file: nothing falls back to a code default."""
    load_params(PRESETS / f"{name}.yaml")
    assert _unset(Params, _raw(name)) == []


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_has_the_paper_settings(name):
    params = load_params(PRESETS / f"{name}.yaml")
    wrong = {k: (_get(params, k), v) for k, v in EXPECTED[name].items() if _get(params, k) != v}
    assert not wrong, f"{name}: (preset, paper) differ: {wrong}"


@pytest.mark.parametrize("size", ["b", "l"])
def test_released_presets_differ_only_by_skipping_pretraining(size):
    full, released = _raw(f"imagenet-dmae-vit-{size}"), _raw(f"imagenet-dmae-vit-{size}-released")
    assert released["pretrain"] == {**full["pretrain"], "epochs": 0, "warmup_epochs": 0,
                                    "init_from": f"models/imported/dmae-vit-{size}"}
    assert {k: v for k, v in released.items() if k != "pretrain"} == {k: v for k, v in full.items()
                                                                       if k != "pretrain"}


def test_nim_preset_is_the_released_dmae_b_plus_the_full_de3_comparison():
    params = load_params(PRESETS / "imagenet-nim-vit-b.yaml")
    mae = {**{k: v for k, v in NIM_PRETRAIN.items() if not k.startswith("noise.")}, "task": "mae",
           "mask_ratio": 0.75, "noise.dist": "none"}
    for name, expected in {"nim": NIM_PRETRAIN, "mae": mae}.items():
        settings = params.denoiser_settings(name)
        wrong = {k: (_get(settings, k), v) for k, v in expected.items() if _get(settings, k) != v}
        assert not wrong, f"denoiser {name}: (preset, paper) differ: {wrong}"
    finetune = params.defense_finetune()
    assert not {k: v for k, v in NIM_FINETUNE.items() if _get(finetune, k) != v}
    assert set(params.defense.classifiers) == {"undefended", "nim", "mae", "dmae"} and params.attack.figure == "nim"
    nim, released = _raw("imagenet-nim-vit-b"), _raw("imagenet-dmae-vit-b-released")
    assert set(nim["denoised_smoothing"]["chains"]) == {"off_the_shelf", "fine_tuned"}  # its undefended classifier
    del nim["defense"], released["defense"]
    del nim["denoised_smoothing"]["chains"], released["denoised_smoothing"]["chains"]
    autoattack = {**released["attack"]["autoattack"], "classifiers": ["undefended", "nim", "mae", "dmae"]}
    assert nim == {**released, "attack": {**released["attack"], "figure": "nim", "autoattack": autoattack}}


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("imagenet")])
def test_imagenet_de3_classifiers_train_with_nims_augmentation(name):
    assert load_params(PRESETS / f"{name}.yaml").defense_finetune().augment == NIM_FINETUNE_AUGMENT


def test_the_readmes_linear_probe_overrides_give_maes_probe():
    """README.md "The linear probe": the `dvc exp run -S` overrides on an ImageNet preset validate, and the probe
    is MAE's: frozen encoder, BatchNorm1d without affine + Linear, LARS, blr 0.1, batch 16384, 90 epochs."""
    from timm.optim import Lars

    from dmae.train.finetune import FinetuneStep, noisy_inputs

    readme = (PRESETS.parent / "README.md").read_text()
    command = readme[readme.index("dvc exp run -S finetune.mode=linear_probe"):].split("```")[0]
    overrides = [arg.split("=", 1) for arg in command.split() if "=" in arg]
    assert len(overrides) == 15
    raw = _raw("imagenet-dmae-vit-b-released")
    for key, value in overrides:
        *sections, leaf = key.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[leaf] = yaml.safe_load(value)
    cfg = Params.model_validate(raw).finetune
    assert (cfg.mode, cfg.base_lr, cfg.batch_size, cfg.epochs, cfg.weight_decay) == ("linear_probe", 0.1, 16384, 90, 0)
    assert cfg.augment == MAE_FINETUNE_AUGMENT.model_copy(update={"rand_augment": None})
    model = Classifier(Params.model_validate(raw).model.model_copy(update={"preset": "tiny"}).config(
        META["imagenet"]), 1000, cfg.mode)
    assert isinstance(FinetuneStep(cfg, noisy_inputs(cfg, 0.5), model, [], torch.device("cpu")).optimizer(model), Lars)


def test_dmae_presets_add_no_extra_pretraining():
    """Their De^3 section uses the DMAE model itself as the denoiser, so `dvc repro` pretrains one model."""
    for name in NAMES:
        params = load_params(PRESETS / f"{name}.yaml")
        if name != "imagenet-nim-vit-b":
            assert params.defense.denoisers == {} and list(params.defense.classifiers) == ["dmae"], name
            assert params.defense_finetune().consistency.enabled is False


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_the_paper_architecture(name):
    """Parameter counts of REFERENCE.md: encoder 85.8M / 303.3M, with the decoder 111.9M / 329.5M."""
    params = load_params(PRESETS / f"{name}.yaml")
    with torch.device("meta"):
        model = DenoisingMAE(params.model.config(META[params.data.dataset]))
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder_", "mask_token")))
    expected = {"base": (85.8, 111.9), "large": (303.3, 329.5)}[params.model.preset]
    assert (round(encoder / 1e6, 1), round(total / 1e6, 1)) == expected
    assert model.cfg.num_patches == 196


def test_cifar10_noise_at_32_then_bicubic_upsampling_to_224_inside_the_model():
    """The CIFAR-10 preset's path: the encoder sees normalize(bicubic_224(x + sigma * eps)), with eps drawn at
    32x32 and CIFAR-10's mean/std; the fine-tuned classifier sees the same. (A tiny-width model stands in for
    ViT-B: the input path does not depend on the width.)"""
    params = load_params(PRESETS / "cifar10-dmae-vit-b.yaml")
    model_settings = params.model.model_copy(update={"preset": "tiny"})
    cfg = model_settings.config(META["cifar10"])
    assert (cfg.img_size, cfg.patch_size, cfg.mean, cfg.std) == (224, 16, cifar10.MEAN, cifar10.STD)

    torch.manual_seed(0)
    x = torch.rand(2, 3, params.data.image_size, params.data.image_size)
    noisy = add_noise(x, params.pretrain.noise.sigma)
    assert noisy.shape[-1] == 32 and abs((noisy - x).std().item() - 0.25) < 0.02
    mean, std = torch.tensor(cifar10.MEAN).view(1, 3, 1, 1), torch.tensor(cifar10.STD).view(1, 3, 1, 1)

    def expected(img):
        return (F.interpolate(img, size=(224, 224), mode="bicubic", align_corners=False) - mean) / std

    seen = []  # what the patch embedding of each model receives
    autoencoder, classifier = DenoisingMAE(cfg), Classifier(cfg, 10)
    for embed in (autoencoder.patch_embed, classifier.vit.patch_embed):
        embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _, pred, _ = autoencoder(x, noisy, params.pretrain.mask_ratio)
    classifier(noisy)
    assert len(seen) == 2 and pred.shape == (2, 196, 16 * 16 * 3)
    for model_input in seen:
        assert model_input.shape == (2, 3, 224, 224)
        assert torch.allclose(model_input, expected(noisy), atol=1e-6)
    # the reconstruction target is the clean image through the same path
    assert torch.allclose(autoencoder.input_adapter(x), expected(x), atol=1e-6)


runner = CliRunner()


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(PRESETS, tmp_path / "presets")
    (tmp_path / "params.yaml").write_text("sigmas: [0.5]\n")
    return tmp_path


def test_use_preset_copies_a_valid_preset(project):
    result = runner.invoke(app, ["use-preset", "cifar10-dmae-vit-b"])
    assert result.exit_code == 0, result.output
    assert Path("params.yaml").read_text() == (PRESETS / "cifar10-dmae-vit-b.yaml").read_text()


def test_use_preset_refuses_unknown_and_invalid_presets(project):
    unknown = runner.invoke(app, ["use-preset", "imagenet-vit-h"])
    assert unknown.exit_code == 2 and "imagenet-dmae-vit-b" in unknown.output
    Path("presets/broken.yaml").write_text(yaml.safe_dump(params_with({"model": {"preset": "giant"}})))
    invalid = runner.invoke(app, ["use-preset", "broken"])
    assert invalid.exit_code == 2 and "unknown preset 'giant'" in invalid.output
    assert Path("params.yaml").read_text() == "sigmas: [0.5]\n"  # untouched
