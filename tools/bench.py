"""`dmae bench`: throughput of certification and training, all measured side by side in one run.

Every configuration (a "case") runs once to warm up (compilation, allocator, caches), then `rounds` times,
interleaved with all the other cases, so that other work on a shared machine slows them alike; a case's figure is
its best round. Certification is measured for the project's engine (Smooth.certify) and for a loop built the way
locuslab/smoothing builds it; FLOP/s are counted analytically (tools.flops) and compared with a large matrix product
timed in the same run, the practical peak of the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from rich.table import Table
from timm.models.vision_transformer import Attention

from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.settings import Params, merged
from dmae.smoothing import Smooth, certify_from_counts
from dmae.train.batches import MicroBatch
from dmae.train.finetune import FinetuneStep, noisy_inputs
from dmae.train.loop import micro_step
from dmae.train.optim import set_lr
from dmae.train.pretrain import PretrainStep
from dmae.util.accel import compile_for_inference, largest_batch
from dmae.util.io import atomic_write_text, write_json
from dmae.util.progress import progress_bar
from tools.flops import TRAIN_FACTOR, autoencoder_flops, classifier_flops

SIGMA, ALPHA = 0.25, 0.001
REFERENCE = "reference loop"
ENGINE = "engine"


@dataclass(frozen=True)
class Sizes:
    n0: int  # CERTIFY's selection samples
    n: int  # CERTIFY's estimation samples (the N of the figures)
    images: int  # images certified per round
    batch_size: int  # certification batch of the reference loop and the engine
    sweep: tuple[int, ...]  # further engine batch sizes
    train_batch: int
    steps: int  # training steps per round
    rounds: int
    matmul: int  # side of the square matrix product that measures the peak


@dataclass(frozen=True)
class Target:
    cfg: ModelConfig
    num_classes: int
    full: Sizes
    quick: Sizes


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGETS = {
    # the embedded default: digits, 1x16x16, patch 4
    "tiny": Target(ModelConfig("tiny", 16, 4, 1, (0.5,), (0.25,)), 10,
                   full=Sizes(100, 2000, 1, 1000, (250, 2000), 128, 3, 5, 2048),
                   quick=Sizes(10, 100, 1, 50, (), 16, 1, 1, 256)),
    # the paper's ViT-B/16 on ImageNet-sized inputs
    "base": Target(ModelConfig("base", 224, 16, 3, IMAGENET_MEAN, IMAGENET_STD), 1000,
                   full=Sizes(8, 32, 1, 16, (8, 32), 8, 1, 4, 2048),
                   quick=Sizes(2, 8, 1, 4, (), 2, 1, 1, 256)),
}


@dataclass
class Case:
    section: str  # peak | certify | pretrain | finetune
    name: str
    precision: str
    batch_size: int | None
    images: int  # images per run (0 for the matrix product)
    samples: int  # noisy forward samples per run (certification)
    flops: float  # FLOPs per run
    run: Callable[[], object]
    baseline: str | None = None  # the case its speed-up is against
    same_as: str | None = None  # the case whose certificates it must reproduce exactly


# -- the reference loop ---------------------------------------------------------------------------------------

def reference_counts(model, x: torch.Tensor, num: int, batch_size: int, sigma: float, num_classes: int, *,
                     inference_mode: bool = False, count_on_device: bool = False) -> np.ndarray:
    """Class counts as locuslab/smoothing's Smooth._sample_noise makes them: fp32 under no_grad, the input repeated
    per batch, noise from torch.randn_like, predictions copied to the host and counted in a Python loop.

    Each flag turns one of those into what the engine does (for the before/after figures).
    """
    grad_mode = torch.inference_mode() if inference_mode else torch.no_grad()
    counts = torch.zeros(num_classes, dtype=torch.long, device=x.device) if count_on_device else \
        np.zeros(num_classes, dtype=int)
    with grad_mode:
        for start in range(0, num, batch_size):
            batch = x.repeat((min(batch_size, num - start), 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            if count_on_device:
                counts += torch.bincount(predictions, minlength=num_classes)
            else:
                for idx in predictions.cpu().numpy():
                    counts[idx] += 1
    return counts.cpu().numpy() if count_on_device else counts


def reference_certify(model, x, *, n0: int, n: int, alpha: float, batch_size: int, sigma: float,
                      num_classes: int, **flags) -> tuple[int, float]:
    """CERTIFY with reference_counts for both sample sets (same decision as Smooth.certify)."""
    selection = reference_counts(model, x, n0, batch_size, sigma, num_classes, **flags)
    estimation = reference_counts(model, x, n, batch_size, sigma, num_classes, **flags)
    return certify_from_counts(selection, estimation, alpha, sigma)


@contextlib.contextmanager
def fused_attention(model: torch.nn.Module, enabled: bool):
    """Switch timm's fused attention (F.scaled_dot_product_attention) on or off inside the block."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = enabled
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.fused_attn = value


# -- cases ----------------------------------------------------------------------------------------------------

def peak_cases(size: int, device: torch.device) -> list[Case]:
    """Square matrix products in fp32 and bf16: what the device does at best."""
    reps = 10 if device.type == "cuda" else 3
    cases = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(size, size, generator=gen, device=device).to(dtype) for _ in range(2))

        def run(a=a, b=b):
            for _ in range(reps):
                a @ b

        cases.append(Case("peak", f"matrix product {size}x{size}", precision, None, 0, 0, 2 * size**3 * reps, run))
    cases[1].baseline = cases[0].name
    return cases


def certify_cases(target: Target, sizes: Sizes, device: torch.device, compile: bool) -> list[Case]:
    cfg, classes = target.cfg, target.num_classes
    torch.manual_seed(0)
    model = Classifier(cfg, classes).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(1)
    images = torch.rand(sizes.images, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen, device=device)
    samples = sizes.images * (sizes.n0 + sizes.n)
    flops = samples * classifier_flops(cfg, classes)
    args = {"n0": sizes.n0, "n": sizes.n, "alpha": ALPHA}

    def case(name, precision, batch, run, same_as=None):
        return Case("certify", name, precision, batch, sizes.images, samples, flops, run, REFERENCE, same_as)

    def reference(**flags):
        def run():
            torch.manual_seed(0)
            return [reference_certify(model, x, batch_size=sizes.batch_size, sigma=SIGMA, num_classes=classes,
                                      **args, **flags) for x in images]
        return run

    def engine(precision, batch, net=model, fused=True):
        smooth = Smooth(net, classes, SIGMA, precision=precision)

        def run():
            with fused_attention(net, fused):
                return [smooth.certify(x, batch_size=batch, index=i, **args) for i, x in enumerate(images)]
        return run

    b = sizes.batch_size
    engine_fp32 = f"{ENGINE}, batch {b}"
    cases = [
        case(REFERENCE, "fp32", b, reference()),
        case("reference + inference_mode", "fp32", b, reference(inference_mode=True)),
        case("reference + inference_mode + counts on device", "fp32", b,
             reference(inference_mode=True, count_on_device=True)),
        case(engine_fp32, "fp32", b, engine("fp32", b)),
        case(f"{ENGINE}, unfused attention", "fp32", b, engine("fp32", b, fused=False), same_as=engine_fp32),
        case(f"{ENGINE}, batch {b}", "bf16", b, engine("bf16", b)),
    ]
    for precision in ("fp32", "bf16"):
        batches = list(sizes.sweep)
        if device.type == "cuda":
            batches.append(largest_batch(model, images[0], precision, limit=sizes.n))
        for batch in dict.fromkeys(x for x in batches if x != b):
            cases.append(case(f"{ENGINE}, batch {batch}", precision, batch, engine(precision, batch),
                              same_as=engine_fp32 if precision == "fp32" else None))
    if compile:
        modes = {"torch.compile": False}
        if device.type == "cuda":
            modes["torch.compile, CUDA graphs"] = True
        for label, cuda_graphs in modes.items():
            # a copy: toggling attention in the unfused case must not recompile it
            compiled = compile_for_inference(copy.deepcopy(model), cuda_graphs)
            for precision in ("fp32", "bf16"):
                cases.append(case(f"{ENGINE} + {label}, batch {b}", precision, b, engine(precision, b, net=compiled),
                                  same_as=engine_fp32 if precision == "fp32" else None))
    return cases


def training_cases(target: Target, sizes: Sizes, device: torch.device, params: Params) -> list[Case]:
    """Pretraining and fine-tuning steps as the training loop takes them (dmae.train.loop.micro_step over the
    real PretrainStep / FinetuneStep: keyed noise drawn, forward, backward, AdamW), per precision, with the
    pretrain and finetune settings of `params` at the bench's batch size."""
    cfg, classes, batch = target.cfg, target.num_classes, sizes.train_batch
    gen = torch.Generator(device=device).manual_seed(2)
    clean = torch.rand(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen, device=device)
    labels = torch.randint(classes, (batch,), generator=gen, device=device)
    images = batch * sizes.steps
    one_step = {"batch_size": batch, "accum_steps": 1}
    pre_cfg = merged(params.pretrain, one_step, "pretrain")
    fine_cfg = merged(params.finetune, one_step, "finetune")

    torch.manual_seed(0)
    autoencoder = DenoisingMAE(cfg).to(device).train()
    classifier = Classifier(cfg, classes, drop_path=fine_cfg.drop_path).to(device).train()
    inputs = noisy_inputs(fine_cfg, SIGMA)
    steps = {"pretrain": (autoencoder, PretrainStep(pre_cfg, autoencoder, tuple(clean.shape[1:]))),
             "finetune": (classifier, FinetuneStep(fine_cfg, inputs, classifier, val_set=None, device=device))}
    optimizers = {}
    for section, (model, step) in steps.items():
        optimizers[section] = step.optimizer(model)
        set_lr(optimizers[section], 1e-4)
        step.start_epoch(0)

    def train_steps(section: str, precision: str):
        model, step = steps[section]

        def run():
            for s in range(sizes.steps):
                micro_step(model, optimizers[section], step, MicroBatch(0, s, clean, labels, range(batch), True),
                           1, precision, device)
        return run

    flops = {"pretrain": images * TRAIN_FACTOR * autoencoder_flops(cfg, pre_cfg.mask_ratio),
             "finetune": images * inputs.copies * TRAIN_FACTOR * classifier_flops(cfg, classes)}
    cases = []
    for precision in ("fp32", "bf16"):
        baseline = None if precision == "fp32" else "step"
        for section in steps:
            cases.append(Case(section, "step", precision, batch, images, 0, flops[section],
                              train_steps(section, precision), baseline))
    return cases


# -- measuring ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_mib(device: torch.device) -> float:
    """CUDA: the case's peak allocation. CPU: the process's peak resident set so far (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _timed(case: Case, device: torch.device) -> tuple[float, object, float]:
    _reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    result = case.run()
    _sync(device)
    return time.perf_counter() - start, result, _peak_memory_mib(device)


def measure(cases: list[Case], rounds: int, device: torch.device, progress: bool = False) -> list[dict]:
    """One warm-up run per case, then `rounds` interleaved rounds; one row per case, in case order."""
    key = [(c.section, c.name, c.precision) for c in cases]
    first, results, times, memory = {}, {}, {k: [] for k in key}, {}
    with progress_bar(progress, unit="run") as bar:
        task = bar.add_task("bench", total=len(cases) * (rounds + 1), status="")
        for k, case in zip(key, cases):
            bar.update(task, status=f"warm-up: {case.section} {case.name} {case.precision}")
            first[k], results[k], memory[k] = _timed(case, device)
            bar.advance(task)
        for r in range(rounds):
            for k, case in zip(key, cases):
                bar.update(task, status=f"round {r + 1}/{rounds}: {case.section} {case.name} {case.precision}")
                seconds, _, mib = _timed(case, device)
                times[k].append(seconds)
                memory[k] = max(memory[k], mib)
                bar.advance(task)

    rows = []
    for k, case in zip(key, cases):
        best = min(times[k])
        rows.append({
            "section": case.section, "name": case.name, "precision": case.precision, "batch_size": case.batch_size,
            "best_s": best, "median_s": statistics.median(times[k]), "first_s": first[k],
            "images_per_s": case.images / best if case.images else None,
            "samples_per_s": case.samples / best if case.samples else None,
            "flops_per_s": case.flops / best, "peak_memory_mib": memory[k],
            "baseline": case.baseline, "same_as": case.same_as,
            "result": results[k] if case.section == "certify" else None,
        })
    _relate(rows)
    return rows


def _relate(rows: list[dict]) -> None:
    """Add each row's fraction of the peak at its precision, speed-up over its baseline (the same work per run)
    and whether it reproduced the certificates of its fp32 twin."""
    def find(section, name, precision):
        return next(r for r in rows if (r["section"], r["name"], r["precision"]) == (section, name, precision))

    for row in rows:
        peak = next(r for r in rows if r["section"] == "peak" and r["precision"] == row["precision"])
        row["peak_fraction"] = row["flops_per_s"] / peak["flops_per_s"]
        base = find(row["section"], row["baseline"], "fp32") if row["baseline"] else None
        row["speedup"] = base["best_s"] / row["best_s"] if base else None
        twin = find("certify", row["same_as"], "fp32") if row["same_as"] else None
        row["same_certificates"] = row["result"] == twin["result"] if twin else None
    for row in rows:
        del row["result"]


# -- the report -----------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(preset: str, params: Params, *, device: torch.device, quick: bool = False, compile: bool = False,
              progress: bool = False, **overrides) -> dict:
    """Measure every case of `preset` (TARGETS) on `device`; `overrides` replace fields of its Sizes."""
    target = TARGETS[preset]
    sizes = dataclasses.replace(target.quick if quick else target.full, **overrides)
    cases = (peak_cases(sizes.matmul, device) + certify_cases(target, sizes, device, compile)
             + training_cases(target, sizes, device, params))
    uses_fused = all(m.fused_attn for m in Classifier(target.cfg, target.num_classes).modules()
                     if isinstance(m, Attention))
    return {
        "preset": preset, "quick": quick, "compile": compile, "model": target.cfg.to_dict(),
        "num_classes": target.num_classes, "sizes": dataclasses.asdict(sizes), "machine": machine(device),
        "fused_attention": uses_fused, "sigma": SIGMA, "alpha": ALPHA,
        "flops_per_image": {"classifier_forward": classifier_flops(target.cfg, target.num_classes),
                            "autoencoder_forward": autoencoder_flops(target.cfg, params.pretrain.mask_ratio)},
        "rows": measure(cases, sizes.rounds, device, progress),
    }


COLUMNS = ("section", "configuration", "precision", "batch", "images/s", "samples/s", "GFLOP/s", "% of peak",
           "speed-up", "same certificates", "peak MiB")
NOTES = ("speed-up: certification against the reference loop, training and the bf16 matrix product against fp32; "
         "same certificates: identical (class, radius) to the fp32 engine at the reference batch; peak MiB: CUDA "
         "max_memory_allocated of the case, on CPU the process's peak RSS so far (getrusage)")


def _cells(row: dict) -> tuple[str, ...]:
    def num(value, fmt=None):
        if value is None:
            return "—"
        return format(value, fmt or (",.0f" if value >= 100 else ".3g"))  # three significant digits at least

    same = {None: "—", True: "yes", False: "NO"}[row["same_certificates"]]
    speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    return (row["section"], row["name"], row["precision"], num(row["batch_size"], "d"),
            num(row["images_per_s"]), num(row["samples_per_s"]), num(row["flops_per_s"] / 1e9),
            num(100 * row["peak_fraction"], ".1f"), speedup, same, num(row["peak_memory_mib"], ",.0f"))


def markdown(report: dict) -> str:
    m, s = report["machine"], report["sizes"]
    flops = report["flops_per_image"]
    lines = [
        f"# dmae bench: preset {report['preset']}{' (quick)' if report['quick'] else ''}",
        "",
        f"- device: {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; CPU {m['cpu']}, {m['cpu_cores']} "
        f"cores, {m['torch_threads']} torch threads, {m['cpu_capability']}; torch {m['torch']}, timm {m['timm']}",
        f"- certification: {s['images']} image(s) x (n0 {s['n0']} + N {s['n']}) samples, sigma {report['sigma']}; "
        f"training batch {s['train_batch']} x {s['steps']} step(s); best of {s['rounds']} interleaved round(s)",
        f"- forward FLOPs per image: classifier {flops['classifier_forward']:,}, autoencoder "
        f"{flops['autoencoder_forward']:,}; fused attention (scaled_dot_product_attention): "
        f"{report['fused_attention']}",
        f"- {NOTES}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report["rows"]]
    return "\n".join(lines) + "\n"


def rich_table(report: dict) -> Table:
    table = Table(title=f"dmae bench: {report['preset']} on {report['machine']['device']}", caption=NOTES)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i < 3 else "right")
    for row in report["rows"]:
        table.add_row(*_cells(row))
    return table


def write_report(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the markdown table to `out` and the full report as JSON beside it (same name, .json)."""
    out = Path(out)
    json_path = out.with_suffix(".json")
    atomic_write_text(out, markdown(report))
    write_json(json_path, report)
    return out, json_path
