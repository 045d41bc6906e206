"""`dmae bench-input`: the ImageNet input pipeline on this CPU, per core, and the cores a GPU needs to keep up.

On fabricated JPEGs of ImageNet's typical size and quality (around 500x375, ~110 KB: ImageNet train is 138 GB in
1.28M files), each case reads a file and turns it into the model's input in one process with one thread (so the
figure is per core; data-loader workers scale it with the cores): decoding alone, then the pipeline's own
transforms (dmae.data.augment.training_transform with the recipes of presets/imagenet-nim-vit-b.yaml: pretraining's
RandomResizedCrop 0.2-1 + flip; fine-tuning's RandomResizedCrop 0.08-1 + flip + RandAugment, and with NIM's random
erasing), the test view (resize to 256/224 of the crop, centre crop). `torchvision.io.decode_jpeg` is timed
beside PIL as the alternative decoder.

The cores per GPU: the images/s a GPU consumes at the sustained throughput README.md assumes (tools.projection),
divided by one core's images/s for that stage's transform.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmae.data.augment import training_transform
from dmae.data.imagenet import MEAN, STD
from dmae.data.loading import _evaluation_view
from dmae.models.architectures import ModelConfig
from dmae.settings import augment_options, load_params
from tools import fabricate
from tools.flops import TRAIN_FACTOR, autoencoder_flops, classifier_flops
from tools.projection import GPU_FLOPS

PRESETS = Path(__file__).resolve().parents[1] / "presets"
IMAGENET_MEAN_BYTES = 108_000  # 138 GB / 1,281,167 training images


@dataclass(frozen=True)
class Case:
    name: str
    images_per_s: float  # one core
    seconds: list[float]  # per round


def fabricate_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """JPEGs like ImageNet's: sizes around 500x375, quality 85-95, texture tuned to ~108 KB per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.fromarray(fabricate.photo(rng, i % 10, fabricate.photo_size(rng), noise=34))
        path = folder / f"image_{i:05d}.JPEG"
        image.save(path, format="JPEG", quality=int(rng.integers(85, 96)))
        paths.append(path)
    return paths


def _pil_decode(path: Path):
    with Image.open(path) as image:
        return image.convert("RGB")


def _torchvision_decode(path: Path):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def cases(preset: Path = PRESETS / "imagenet-nim-vit-b.yaml") -> dict[str, callable]:
    """Each case: a file path -> what the pipeline makes of it, with the preset's augmentation recipes."""
    from torchvision import transforms as T

    params = load_params(preset)
    size = params.data.image_size

    def view(augment):
        return training_transform(size, MEAN, STD, [], **augment_options(augment))

    pretrain, finetune, de3 = view(params.pretrain.augment), view(params.finetune.augment), \
        view(params.defense_finetune().augment)
    test = T.Compose([*_evaluation_view(size), T.ToTensor()])
    return {
        "decode (PIL)": _pil_decode,
        "decode (torchvision.io.decode_jpeg)": _torchvision_decode,
        "pretraining view: decode + RandomResizedCrop(0.2-1) + flip": lambda p: pretrain(_pil_decode(p)),
        "fine-tuning view: decode + RandomResizedCrop(0.08-1) + flip + RandAugment m9":
            lambda p: finetune(_pil_decode(p)),
        "De³ view: the fine-tuning view + random erasing 0.25": lambda p: de3(_pil_decode(p)),
        "test view: decode + resize 256 + centre crop 224": lambda p: test(_pil_decode(p)),
    }


def measure(paths: list[Path], rounds: int = 3) -> list[Case]:
    """Each case over every file, `rounds` times interleaved with the others; a case's figure is its best round."""
    torch.set_num_threads(1)
    fns = cases()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: file cache, libraries
        fn(paths[0])
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for path in paths:
                fn(path)
            times[name].append(time.perf_counter() - t0)
    return [Case(name, len(paths) / min(t), t) for name, t in times.items()]


def consumption(preset_dir: Path = PRESETS) -> list[tuple[str, str, float]]:
    """(preset, training stage, images/s one GPU consumes at GPU_FLOPS) for every preset's training stages."""
    out = []
    for path in sorted(preset_dir.glob("*.yaml")):
        params = load_params(path)
        if params.data.dataset != "imagenet":
            continue
        cfg = ModelConfig(params.model.preset, params.model.img_size, params.model.patch_size, 3, (0.5,) * 3,
                          (0.5,) * 3)
        if params.pretrain.epochs:
            flops = TRAIN_FACTOR * autoencoder_flops(cfg, params.pretrain.mask_ratio)
            out.append((path.stem, "pretrain", GPU_FLOPS / flops))
        for name in params.defense.denoisers:
            d = params.denoiser_settings(name)
            if d.epochs:
                flops = TRAIN_FACTOR * autoencoder_flops(cfg, d.mask_ratio)
                out.append((path.stem, f"denoiser@{name}", GPU_FLOPS / flops))
        ft = params.finetune
        copies = ft.consistency.m if ft.consistency.enabled else 1
        out.append((path.stem, "finetune", GPU_FLOPS / (TRAIN_FACTOR * copies * classifier_flops(cfg, 1000))))
    return out


def markdown(results: list[Case], paths: list[Path]) -> str:
    mean_kb = statistics.mean(p.stat().st_size for p in paths) / 1000
    lines = [f"{len(paths)} fabricated JPEGs, mean {mean_kb:.0f} KB; one process, one thread; best of "
             f"{len(results[0].seconds)} rounds; {os.cpu_count()} cores here.", "",
             "| case | images/s per core |", "|---|---:|"]
    lines += [f"| {c.name} | {c.images_per_s:,.0f} |" for c in results]
    per_core = {stage: next(c.images_per_s for c in results if c.name.startswith(prefix))
                for stage, prefix in (("pretrain", "pretraining view"), ("finetune", "fine-tuning view"),
                                      ("denoiser", "pretraining view"))}
    lines += ["", f"Cores per GPU to keep up, at {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained (each stage's view above):",
              "", "| preset | stage | images/s per GPU | cores per GPU |", "|---|---|---:|---:|"]
    lines += [f"| {preset} | {stage} | {rate:,.0f} | {rate / per_core[stage.split('@')[0]]:,.0f} |"
              for preset, stage, rate in consumption()]
    return "\n".join(lines) + "\n"
