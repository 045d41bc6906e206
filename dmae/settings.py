"""Validated settings: one pydantic model per params.yaml section.

Everything that changes a result is a tracked param read from params.yaml (unknown keys rejected, ranges
checked). Machine-local knobs that do not change results (device, data-loader workers, progress bars) come from
the environment through `Runtime`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError,
                      WrapSerializer, model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from dmae.models.architectures import ARCHITECTURES
from dmae.models.architectures import ModelConfig
from dmae.util.errors import UserError

def _number(value):
    """YAML's true/false are not numbers (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Number = BeforeValidator(_number)
Count = Annotated[int, Number, Field(ge=1, le=10**9)]
Seed = Annotated[int, Number, Field(ge=0, lt=2**63)]
PosFloat = Annotated[float, Number, Field(gt=0, le=1e6)]
NonNegFloat = Annotated[float, Number, Field(ge=0, le=1e6)]
Probability = Annotated[float, Number, Field(ge=0, le=1)]
Fraction = Annotated[float, Number, Field(gt=0, le=1)]
Sigma = Annotated[float, Number, Field(gt=0, le=10)]  # a noise level in [0,1] pixel units
Radius = Annotated[float, Number, Field(ge=0, le=100)]
LearningRate = Annotated[float, Number, Field(gt=0, le=10)]
Precision = Literal["fp32", "bf16"]


def _count_or_all(value):
    if value == "all" or type(value) is int and 1 <= value <= 10**9:
        return value
    raise ValueError("expected a count (an integer >= 1) or all")


CountOrAll = Annotated[int | Literal["all"], PlainValidator(_count_or_all)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf/nan: never valid


class DataSettings(Section):
    dataset: Literal["digits", "cifar10", "imagenet"]
    root: str
    download: bool
    image_size: Annotated[int, Number, Field(ge=1, le=4096)]
    val_fraction: Annotated[float, Number, Field(ge=0, lt=1)]  # 0: train on all of train, no held-out metrics
    test_every: Count
    seed: Seed

    def prepare_options(self) -> dict:
        """The keyword options of this data set's prepare function (dmae.data.prepare_dataset)."""
        common = {"val_fraction": self.val_fraction, "seed": self.seed, "test_every": self.test_every}
        if self.dataset == "digits":
            return {**common, "image_size": self.image_size}
        if self.dataset == "cifar10":
            return {**common, "root": self.root, "download": self.download}
        return {**common, "root": self.root, "image_size": self.image_size}

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        if self.dataset == "cifar10" and self.image_size != 32:
            raise ValueError(f"image_size {self.image_size}: cifar10 images are 32x32 (set model.img_size to "
                             f"upsample them inside the model)")
        return self


class ModelSettings(Section):
    preset: str
    img_size: Annotated[int, Number, Field(ge=1, le=4096)]
    patch_size: Annotated[int, Number, Field(ge=1, le=4096)]

    def config(self, meta: dict) -> ModelConfig:
        """The model config for a prepared data set: architecture from here, channels and normalization from its
        meta.json."""
        return ModelConfig(preset=self.preset, img_size=self.img_size, patch_size=self.patch_size,
                           in_chans=int(meta["channels"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]))

    @model_validator(mode="after")
    def _check(self) -> "ModelSettings":
        if self.preset not in ARCHITECTURES:
            raise ValueError(f"preset: unknown preset {self.preset!r}; known presets: {', '.join(ARCHITECTURES)}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        return self


class NoiseSettings(Section):
    """Per-image noise level of pretraining: fixed, Uniform(low, high) or Gamma(shape, scale).

    Values are in [0,1] pixel units, or in 0-255 units when `per255` is true (as the NIM paper states them).
    """

    dist: Literal["none", "fixed", "uniform", "gamma"]
    sigma: NonNegFloat
    low: NonNegFloat
    high: NonNegFloat
    shape: PosFloat
    scale: PosFloat
    per255: bool

    @model_validator(mode="after")
    def _check(self) -> "NoiseSettings":
        top = 255.0 if self.per255 else 10.0
        for key in ("sigma", "low", "high"):
            if getattr(self, key) > top:
                raise ValueError(f"{key} = {getattr(self, key)!r}: a noise level must be at most {top:g} "
                                 f"({'0-255' if self.per255 else '[0,1] pixel'} units)")
        if self.dist == "uniform" and not self.high > self.low:
            raise ValueError(f"uniform noise needs high > low (got low={self.low}, high={self.high})")
        return self


RAND_AUGMENT = re.compile(r"rand(-(m|n|mstd|mmax|inc|p)\d+(\.\d+)?)*")  # timm's RandAugment policies


class AugmentSettings(Section):
    """Training-image augmentation with timm's transforms, in timm's order, on the clean image before the noise
    (dmae/data/augment.py): RandomResizedCrop (bicubic) or none, horizontal flip, RandAugment, random erasing."""

    crop_scale: tuple[Fraction, Fraction] | None  # the crop's share of the image area; null: no random crop
    crop_ratio: tuple[PosFloat, PosFloat] | None  # its aspect ratio (width / height); null with crop_scale
    hflip: Probability
    rand_augment: str | None  # timm's policy string, e.g. rand-m9-mstd0.5-inc1
    erase_prob: Probability  # timm's RandomErasing: probability per image, fill mode, 1 to erase_count boxes
    erase_mode: Literal["const", "rand", "pixel"]
    erase_count: Count

    @model_validator(mode="after")
    def _check(self) -> "AugmentSettings":
        if (self.crop_scale is None) != (self.crop_ratio is None):
            raise ValueError("crop_scale and crop_ratio: set both (a random crop) or neither (null: no crop)")
        for key in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, key) or (0, 0)
            if low > high:
                raise ValueError(f"{key} = [{low}, {high}]: expected [low, high] with low <= high")
        if self.rand_augment is not None and not RAND_AUGMENT.fullmatch(self.rand_augment):
            raise ValueError(f"rand_augment = {self.rand_augment!r}: not a RandAugment policy in timm's syntax "
                             f"(rand, then -m<magnitude>, -n<ops>, -mstd<std>, -mmax<max>, -inc<0|1>, -p<prob>)")
        if (self.crop_scale, self.hflip, self.rand_augment, self.erase_prob) == (None, 0, None, 0):
            raise ValueError("every augmentation is off: write `augment: none`")
        return self


def _augment_or_none(value):
    if value is None or isinstance(value, str) and value != "none":
        raise ValueError("expected none or a section of augmentation keys (crop_scale, crop_ratio, hflip, "
                         "rand_augment, erase_prob, erase_mode, erase_count)")
    return None if value == "none" else value


# `none` (the images as stored; ImageNet: resized and centre-cropped) or the augmentation section
Augment = Annotated[AugmentSettings | None, BeforeValidator(_augment_or_none),
                    WrapSerializer(lambda value, dump: "none" if value is None else dump(value))]


def augment_options(augment: AugmentSettings | None) -> dict | None:
    """The `augment` argument of dmae.data.load_split for an `augment` setting."""
    return None if augment is None else augment.model_dump()


class PretrainSettings(Section):
    task: Literal["dmae", "nim", "mae"]
    mask_ratio: Annotated[float, Field(ge=0, lt=1)]
    noise: NoiseSettings
    norm_pix_loss: bool
    epochs: Annotated[int, Number, Field(ge=0, le=10**6)]  # 0: use init_from as it is (e.g. a released model)
    batch_size: Count
    accum_steps: Count
    base_lr: LearningRate
    weight_decay: NonNegFloat
    warmup_epochs: NonNegFloat
    min_lr: Annotated[float, Number, Field(ge=0, le=10)]
    augment: Augment
    precision: Precision
    init_from: str | None
    seed: Seed

    @property
    def reconstruct_groups(self) -> int:
        """How the model denoises at test time (DenoisingMAE.reconstruct): in one pass (1), or, for an MAE, which
        learned only to predict masked patches, over 1 / (1 - mask_ratio) complementary masks."""
        return max(2, round(1 / (1 - self.mask_ratio))) if self.task == "mae" else 1

    @model_validator(mode="after")
    def _check(self) -> "PretrainSettings":
        if self.task == "mae" and self.noise.dist != "none":
            raise ValueError("task 'mae' is masking only: set noise.dist to 'none'")
        if self.task == "mae" and self.mask_ratio == 0:
            raise ValueError("task 'mae' needs mask_ratio > 0")
        if self.task == "nim" and self.mask_ratio != 0:
            raise ValueError("task 'nim' is noise only: set mask_ratio to 0")
        if self.task in ("dmae", "nim") and self.noise.dist == "none":
            raise ValueError(f"task {self.task!r} needs noise: set noise.dist to fixed, uniform or gamma")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        if self.epochs == 0 and not self.init_from:
            raise ValueError("epochs 0 skips pretraining, so it needs init_from (a checkpoint folder written by "
                             "`dmae import-checkpoint`)")
        if self.epochs and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        return self


class ConsistencySettings(Section):
    """Consistency regularization (Jeong & Shin 2020): m noisy copies, KL weight lam, entropy weight eta."""

    enabled: bool
    m: Annotated[int, Field(ge=2)]
    lam: NonNegFloat
    eta: dict[Sigma, NonNegFloat]


class FinetuneSettings(Section):
    mode: Literal["full", "linear_probe"]
    init: Literal["pretrained", "scratch"]
    epochs: Count | dict[Sigma, Count]  # one number, or one per sigma (noisier inputs train slower)
    batch_size: Count
    accum_steps: Count
    base_lr: LearningRate
    layer_decay: Annotated[float, Field(gt=0, le=1)]
    weight_decay: NonNegFloat
    drop_path: Annotated[float, Field(ge=0, lt=1)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    mixup: NonNegFloat
    cutmix: NonNegFloat
    warmup_epochs: NonNegFloat
    min_lr: Annotated[float, Number, Field(ge=0, le=10)]
    augment: Augment
    consistency: ConsistencySettings
    precision: Precision
    seed: Seed

    @model_validator(mode="after")
    def _check(self) -> "FinetuneSettings":
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        fewest = self.epochs if isinstance(self.epochs, int) else min(self.epochs.values(), default=0)
        if self.warmup_epochs > fewest:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} exceeds epochs {self.epochs}")
        if self.mode == "linear_probe" and self.init == "scratch":
            raise ValueError("a linear probe needs a pretrained encoder: set init to 'pretrained'")
        return self

    def epochs_at(self, sigma: float) -> int:
        """The number of epochs at noise level sigma (params check that every sigma has one)."""
        return self.epochs if isinstance(self.epochs, int) else self.epochs[sigma]


class CertifySettings(Section):
    method: Literal["cohen", "mixture", "union"]  # CERTIFY with n samples, or adaptive with at most n_max
    test_every: Count  # certify every k-th example of the test split (which the attack stage draws from whole)
    n0: Count
    n: Count
    n_max: Count
    alpha: Annotated[float, Field(gt=0, lt=1)]
    batch_size: Count
    precision: Precision
    seed: Seed


class ReportSettings(Section):
    radii: Annotated[list[Radius], Field(min_length=1)]


Name = Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]  # names that become folder names
MAIN_DENOISER = "dmae"  # the denoiser name of the main `pretrain` output
PER_SIGMA = "per_sigma"  # the classifier of a chain fine-tuned on its denoiser's outputs at each sigma


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: sections (mappings with named keys) merged key by key; anything else,
    per-sigma tables such as finetune.epochs included, replaced whole."""
    def section(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)

    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out[key], value) if section(value) and section(out.get(key)) else value
    return out


class DefendedClassifier(Section):
    """One fine-tuned classifier of the De^3 comparison.

    input: what it is fine-tuned on (clean | noisy | denoised: noised at sigma ~ U(0, train_sigma_max), then
    denoised); encoder: the pretrained model it starts from; denoiser: the frozen model of the defense (and of
    input 'denoised'); null evaluates the classifier alone, undefended. Model names: 'dmae' (the `pretrain`
    output) or a key of defense.denoisers.
    """

    input: Literal["clean", "noisy", "denoised"]
    encoder: Name
    denoiser: Name | None

    @model_validator(mode="after")
    def _check(self) -> "DefendedClassifier":
        if self.input == "denoised" and self.denoiser is None:
            raise ValueError("input 'denoised' needs a denoiser")
        return self


class DefenseSettings(Section):
    """NIM / De^3: denoisers pretrained as variants of `pretrain`, and the classifiers fine-tuned for them."""

    denoisers: dict[Name, dict[str, Any]]  # name -> keys of `pretrain` it overrides
    classifiers: dict[Name, DefendedClassifier]
    train_sigma_max: Probability
    finetune: dict[str, Any]  # keys of `finetune` the De^3 classifiers override


class PGDSettings(Section):
    steps: Count
    step_size: Probability
    random_start: bool


class SquareSettings(Section):
    queries: Count
    p_init: Annotated[float, Field(gt=0, le=1)]


class AutoAttackBudget(Section):
    """How hard AutoAttack tries; the package's 'standard' / 'rand' values are STANDARD_BUDGET (the papers')."""

    iterations: Count  # APGD-CE, APGD-T, APGD-DLR and FAB-T iterations
    target_classes: Count  # APGD-T and FAB-T target classes (at most the model's classes - 1)
    square_queries: Count
    eot_iter: Count  # 'rand': gradient draws averaged per APGD iteration

    def reduced(self) -> list[str]:
        """The keys set below the package's standard values (the report says so)."""
        return [k for k, v in STANDARD_BUDGET.items() if getattr(self, k) < v]


STANDARD_BUDGET = {"iterations": 100, "target_classes": 9, "square_queries": 5000, "eot_iter": 20}


class AutoAttackSettings(Section):
    """AutoAttack (pyautoattack) on `examples` of the attack examples (those drawn first: a random subset), for the
    classifiers in `classifiers` at the test sigmas in `test_sigmas` (a classifier without a denoiser has the one
    row at sigma 0)."""

    versions: list[Literal["standard", "rand"]]
    examples: CountOrAll  # all: every attack example
    classifiers: list[Name]  # keys of defense.classifiers
    test_sigmas: list[Annotated[float, Number, Field(ge=0, le=10)]]  # a subset of attack.test_sigmas
    budget: AutoAttackBudget


class AttackSettings(Section):
    """l-infinity attacks on every classifier of defense.classifiers, through its defense at each test sigma."""

    examples: CountOrAll  # a seeded subset of the test split, or all of it
    batch_size: Count
    test_sigmas: list[Annotated[float, Number, Field(ge=0, le=10)]]
    eps: Probability
    eps_sweep: list[Probability]  # extra white-box PGD budgets for the sanity checks (0 and a large one)
    pgd: PGDSettings
    eot: Count
    draws: Count  # noise draws of a randomized defense per attacked example when evaluating (mean and worst)
    square: SquareSettings
    autoattack: AutoAttackSettings
    figure: Name
    seed: Seed

    @model_validator(mode="after")
    def _check(self) -> "AttackSettings":
        lists = {"test_sigmas": self.test_sigmas, "eps_sweep": self.eps_sweep,
                 "autoattack.versions": self.autoattack.versions, "autoattack.test_sigmas": self.autoattack.test_sigmas,
                 "autoattack.classifiers": self.autoattack.classifiers}
        for key, values in lists.items():
            if len(set(values)) != len(values):
                raise ValueError(f"{key} has duplicates: {values}")
        if not self.test_sigmas:
            raise ValueError("test_sigmas is empty")
        if unknown := [s for s in self.autoattack.test_sigmas if s not in self.test_sigmas]:
            raise ValueError(f"autoattack.test_sigmas {unknown} are not in test_sigmas {self.test_sigmas}")
        if "all" not in (self.examples, self.autoattack.examples) and self.autoattack.examples > self.examples:
            raise ValueError(f"autoattack.examples = {self.autoattack.examples} is more than examples = "
                             f"{self.examples}")
        return self

    def autoattack_columns(self, classifier: str, sigma: float) -> list[str]:
        """The AutoAttack columns run for `classifier` at test sigma `sigma` ('rand' needs noise: not at 0)."""
        if classifier not in self.autoattack.classifiers or sigma not in self.autoattack.test_sigmas:
            return []
        return [f"autoattack_{v}" for v in self.autoattack.versions if v == "standard" or sigma > 0]


class ChainSpec(Section):
    """A denoise-then-classify base classifier: `denoiser` (dmae or a key of defense.denoisers) and `classifier`
    (a key of defense.classifiers, e.g. the undefended one fine-tuned on clean images, or per_sigma)."""

    denoiser: Name
    classifier: Name


class ChainFinetune(Section):
    """The per_sigma classifier: fine-tuned from `encoder` on `denoiser`'s reconstructions of noisy images at the
    certification sigma, with the De^3 fine-tuning settings."""

    denoiser: Name
    encoder: Name


class DenoisedSmoothingSettings(Section):
    """Certified robustness of denoise-then-classify chains (denoised smoothing), with the certify settings."""

    test_every: Count  # certify every k-th of the examples `certify` certifies
    finetune: ChainFinetune
    chains: dict[Name, ChainSpec]


class Params(Section):
    """All of params.yaml, the one place of every setting that changes a result (no field has a default)."""

    sigmas: Annotated[list[Sigma], Field(min_length=1)]
    cpu_threads: Annotated[int, Number, Field(ge=1, le=1024)]  # changes float summation order on a CPU
    data: DataSettings
    model: ModelSettings
    pretrain: PretrainSettings
    finetune: FinetuneSettings
    certify: CertifySettings
    report: ReportSettings
    defense: DefenseSettings
    attack: AttackSettings
    denoised_smoothing: DenoisedSmoothingSettings

    @model_validator(mode="after")
    def _check(self) -> "Params":
        if len(set(self.sigmas)) != len(self.sigmas):
            raise ValueError(f"sigmas has duplicates: {self.sigmas}")
        if self.finetune.consistency.enabled:
            self._check_per_sigma("finetune.consistency.eta", self.finetune.consistency.eta)
        if isinstance(self.finetune.epochs, dict):
            self._check_per_sigma("finetune.epochs", self.finetune.epochs)
        if self.data.image_size > self.model.img_size:
            raise ValueError(f"data.image_size {self.data.image_size} exceeds model.img_size "
                             f"{self.model.img_size}: images are only ever upsampled to the model input")
        return self

    def _check_per_sigma(self, key: str, values: dict[float, Any]) -> None:
        missing = [s for s in self.sigmas if s not in values]
        if missing:
            raise ValueError(f"{key} has no value for sigma {missing} (sigmas: {self.sigmas})")

    @model_validator(mode="after")
    def _check_defense(self) -> "Params":
        d = self.defense
        if MAIN_DENOISER in d.denoisers:
            raise ValueError(f"defense.denoisers.{MAIN_DENOISER}: the name is taken by the `pretrain` output")
        for name in d.denoisers:
            self.denoiser_settings(name)
        models = [MAIN_DENOISER, *d.denoisers]
        for name, spec in d.classifiers.items():
            for key in ("encoder", "denoiser"):
                value = getattr(spec, key)
                if value is not None and value not in models:
                    raise ValueError(f"defense.classifiers.{name}.{key} = {value!r}: not a pretrained model "
                                     f"(known: {', '.join(models)})")
        finetune = self.defense_finetune()
        if not isinstance(finetune.epochs, int):
            raise ValueError("defense.finetune.epochs: the De^3 classifiers train on a range of sigmas and need "
                             "one number of epochs, not one per sigma")
        if finetune.consistency.enabled:
            raise ValueError("defense.finetune.consistency.enabled: De^3 fine-tuning sees one view per image; "
                             "set it to false")
        chains = self.denoised_smoothing
        named = [("finetune.denoiser", chains.finetune.denoiser), ("finetune.encoder", chains.finetune.encoder),
                 *((f"chains.{name}.denoiser", spec.denoiser) for name, spec in chains.chains.items())]
        for key, value in named:
            if value not in models:
                raise ValueError(f"denoised_smoothing.{key} = {value!r}: not a pretrained model "
                                 f"(known: {', '.join(models)})")
        for name, spec in chains.chains.items():
            if spec.classifier != PER_SIGMA and spec.classifier not in d.classifiers:
                raise ValueError(f"denoised_smoothing.chains.{name}.classifier = {spec.classifier!r}: not "
                                 f"{PER_SIGMA} or a key of defense.classifiers ({', '.join(d.classifiers)})")
        if unknown := [c for c in self.attack.autoattack.classifiers if c not in d.classifiers]:
            raise ValueError(f"attack.autoattack.classifiers {unknown}: not keys of defense.classifiers "
                             f"({', '.join(d.classifiers)})")
        figure = d.classifiers.get(self.attack.figure)
        if figure is None or figure.denoiser is None:
            raise ValueError(f"attack.figure = {self.attack.figure!r}: not a classifier of defense.classifiers "
                             f"with a denoiser")
        return self

    def denoiser_settings(self, name: str) -> PretrainSettings:
        """Pretraining settings of a denoiser: `pretrain` for 'dmae', else `pretrain` with its overrides."""
        if name == MAIN_DENOISER:
            return self.pretrain
        return merged(self.pretrain, self.defense.denoisers[name], f"defense.denoisers.{name}")

    def defense_finetune(self) -> FinetuneSettings:
        """Fine-tuning settings of the De^3 classifiers: `finetune` with defense.finetune's overrides."""
        return merged(self.finetune, self.defense.finetune, "defense.finetune")


def merged(base: Section, overrides: dict[str, Any], key: str) -> Section:
    """`base` with `overrides` deep-merged in, validated as base's class; errors (ValueError) name key.field."""
    try:
        return type(base).model_validate(deep_merge(base.model_dump(), overrides))
    except ValidationError as exc:
        lines = [_describe({**e, "loc": (key, *e["loc"])}) for e in exc.errors()]
        raise ValueError("; ".join(lines)) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if "input" in error and not isinstance(error["input"], dict):
        return f"{key} = {error['input']!r}: {msg}" if key else msg
    return f"{key}: {msg}" if key else msg


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is a UserError naming the file, key and value."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise UserError(f"{path}: holds no settings (empty or only comments); every section is required, "
                        f"e.g. copy the project's params.yaml or one of presets/")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params(**raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise UserError(f"{source}: invalid settings:\n  " + "\n  ".join(lines)) from None


class Runtime(BaseSettings):
    """Machine-local knobs from DMAE_* environment variables; none of them changes a result."""

    model_config = SettingsConfigDict(env_prefix="DMAE_", extra="ignore")

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: Annotated[int, Field(ge=0)] = 0
    progress: bool = True

    def torch_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"DMAE_DEVICE={self.device}: CUDA is not available on this machine")
        return device


def load_runtime() -> Runtime:
    try:
        return Runtime()
    except ValidationError as exc:
        lines = [_describe({**e, "loc": ("DMAE_" + str(e["loc"][0]).upper(),)}) for e in exc.errors()]
        raise UserError("invalid environment:\n  " + "\n  ".join(lines)) from None
