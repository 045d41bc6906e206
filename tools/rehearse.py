"""Rehearse a paper preset: its whole DAG, at toy sizes, in a throw-away copy of the project.

Before anyone spends GPU-hours on a preset: copy the project (code, dvc.yaml; not the user's params.yaml,
dvc.lock, data or outputs) into a workspace, fabricate what the preset reads (tools/fabricate.py: an ImageNet tree
with ImageNet's quirks, a CIFAR-10 archive, the released checkpoints its header imports), shrink only sizes
(`shrink`: epochs, images, examples, N0/N, attack iterations; never the architecture, precision, augmentation,
accumulation or data-set code), run `dvc repro` there, and check what came out: every stage ran, every output
exists, the report holds its tables, and a changed raw image makes `dvc status` name the prepare stage.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dmae.models.imports import model_config
from dmae.settings import Params, parse_params
from tools import fabricate

TOY = {"classes": 5, "train_per_class": 16, "val_per_class": 4, "cifar_per_batch": 20}  # the fabricated data
TOY_SIZES = {  # dotted key -> value; a training section's batch is set from its accumulation (see `shrink`)
    "data.test_every": 2, "certify.test_every": 1,
    "certify.n0": 4, "certify.n": 24, "certify.n_max": 48, "certify.batch_size": 16,
    "attack.examples": 2, "attack.batch_size": 2, "attack.pgd.steps": 2, "attack.eot": 2, "attack.draws": 2,
    "attack.square.queries": 4, "attack.autoattack.examples": 1,
    "attack.autoattack.budget": {"iterations": 2, "target_classes": 2, "square_queries": 4, "eot_iter": 2},
    "denoised_smoothing.test_every": 2,
}
MICRO_BATCH = 2  # images per process and accumulation step
IMPORT = re.compile(r"dmae import-checkpoint (\S+)((?: --[a-z-]+ \S+)*)")


# -- the preset, shrunk ----------------------------------------------------------------------------------------

def _set(raw: dict, dotted: str, value, changes: list[str]) -> None:
    *parents, key = dotted.split(".")
    section = raw
    for part in parents:
        section = section[part]
    if section.get(key) != value:
        changes.append(f"{dotted} {_short(section.get(key))}→{_short(value)}")
        section[key] = value


def _short(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _shrink_training(raw: dict, section: str, base: dict, nproc: int, changes: list[str]) -> None:
    """One epoch (when the section trains at all), no warm-up, the smallest global batch its accumulation and
    the process count allow; `base` is the section its keys default to (defense.* sections override others)."""
    values = raw
    for part in section.split("."):
        values = values[part]
    if values.get("epochs", base.get("epochs")):  # 0: the section does not train (a released model)
        _set(raw, f"{section}.epochs", 1, changes)
    if "warmup_epochs" in values or "epochs" in values:
        _set(raw, f"{section}.warmup_epochs", 0, changes)
    accum = values.get("accum_steps", base.get("accum_steps"))
    if "batch_size" in values or "accum_steps" in values or section in ("pretrain", "finetune"):
        _set(raw, f"{section}.batch_size", accum * nproc * MICRO_BATCH, changes)


def shrink(raw: dict, nproc: int, threads: int) -> tuple[dict, list[str]]:
    """The preset `raw` at toy sizes, and what changed ("key old→new")."""
    raw, changes = copy.deepcopy(raw), []
    _set(raw, "cpu_threads", threads, changes)
    for dotted, value in TOY_SIZES.items():
        _set(raw, dotted, value, changes)
    _shrink_training(raw, "pretrain", raw["pretrain"], nproc, changes)
    _shrink_training(raw, "finetune", raw["finetune"], nproc, changes)
    for name in raw["defense"]["denoisers"]:
        _shrink_training(raw, f"defense.denoisers.{name}", raw["pretrain"], nproc, changes)
    _shrink_training(raw, "defense.finetune", raw["finetune"], nproc, changes)
    return raw, changes


# -- inputs ----------------------------------------------------------------------------------------------------

def import_steps(preset_text: str) -> list[tuple[str, list[str]]]:
    """The `dmae import-checkpoint FILE OPTIONS` steps a preset's header asks for: (FILE, OPTIONS)."""
    return [(m.group(1), m.group(2).split()) for m in IMPORT.finditer(preset_text)]


def _option(options: list[str], name: str, default: str) -> str:
    return options[options.index(name) + 1] if name in options else default


def fabricate_inputs(workspace: Path, params: Params, steps: list[tuple[str, list[str]]]) -> list[str]:
    """Write the raw data and the released checkpoints the preset reads; returns what was made, in words."""
    made = []
    root = workspace / params.data.root
    if params.data.dataset == "imagenet":
        quirks = fabricate.imagenet_tree(root, TOY["classes"], TOY["train_per_class"], TOY["val_per_class"])
        made.append(f"ImageNet tree {params.data.root}: {TOY['classes']} classes x {TOY['train_per_class']} train + "
                    f"{TOY['val_per_class']} val JPEGs around 500x375, with {', '.join(quirks)} files")
    elif params.data.dataset == "cifar10":
        files, _ = fabricate.cifar10_files(TOY["cifar_per_batch"])
        archive = fabricate.write_cifar10_archive(root, files)
        made.append(f"CIFAR-10 archive {archive.relative_to(workspace)}: {TOY['cifar_per_batch']} images per batch")
    for file, options in steps:
        kind = _option(options, "--kind", "autoencoder")
        cfg = model_config(_option(options, "--preset", "base"), int(_option(options, "--img-size", "224")),
                           int(_option(options, "--patch-size", "16")), 3, None, None)
        fabricate.checkpoint(workspace / "released" / Path(file).name, kind, cfg)
        made.append(f"released {kind} checkpoint released/{Path(file).name} ({cfg.preset})")
    return made


# -- the workspace -------------------------------------------------------------------------------------------------

def project_files(root: Path) -> list[str]:
    """The project's files as git sees them (tracked, and new ones it does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                            capture_output=True, check=True)
    return [name for name in listed.stdout.decode().split("\0") if name and (root / name).is_file()]


def make_workspace(root: Path, workspace: Path) -> None:
    """Copy the project into `workspace` without its params.yaml, dvc.lock or DVC state; a git repository of
    its own, DVC outputs hardlinked from the cache (no second copy of each model)."""
    for name in project_files(root):
        if name in ("params.yaml", "dvc.lock"):
            continue
        target = workspace / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    dvc(workspace, "config", "--local", "cache.type", "hardlink,symlink")


def dvc(workspace: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, capture_output=True, text=True,
                          env=env, check=False)


def environment(workspace: Path, nproc: int | None, threads: int) -> dict[str, str]:
    """The stages' environment: this Python's `dmae` first on PATH, running the workspace's copy of the code
    (PYTHONPATH), `nproc` processes per stage (None: each stage's default)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(workspace),
           "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("DMAE_NPROC", None)
    return env | ({"DMAE_NPROC": str(nproc)} if nproc else {})


@dataclass
class Run:
    returncode: int
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds (start to next start)
    tail: list[str] = field(default_factory=list)


def run_dvc_repro(workspace: Path, env: dict, log_path: Path, on_stage=None) -> Run:
    """`dvc repro` in the workspace, its output to `log_path`; seconds per stage from its 'Running stage' lines."""
    started: list[tuple[str, float]] = []
    tail: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()  # so that `tail -f` follows it
            tail = (tail + [line.rstrip("\n")])[-40:]
            if match := re.match(r"Running stage '([^']+)'", line):
                started.append((match.group(1), time.monotonic()))
                if on_stage:
                    on_stage(match.group(1))
        returncode = proc.wait()
    ends = [t for _, t in started[1:]] + [time.monotonic()]
    return Run(returncode, {name: end - t for (name, t), end in zip(started, ends)}, tail)


# -- checks ----------------------------------------------------------------------------------------------------

REPORT_SECTIONS = {  # heading in report.md -> when the params call for it
    "## Certified accuracy, best σ per radius": lambda p: True,
    "## Per σ": lambda p: True,
    "## Published results on": lambda p: p.data.dataset in ("imagenet", "cifar10"),
    "## Denoised smoothing": lambda p: bool(p.denoised_smoothing.chains),
    "## Adversarial robustness": lambda p: bool(p.defense.classifiers),
    "### Attack sanity checks": lambda p: bool(p.defense.classifiers),
    "### Against the NIM paper's protocol": lambda p: bool(p.defense.classifiers),
}


def missing_sections(report: str, params: Params) -> list[str]:
    """The report sections `params` call for that report.md (its text) lacks."""
    problems = [f"report.md lacks the section {heading!r}" for heading, wanted in REPORT_SECTIONS.items()
                if wanted(params) and heading not in report]
    if params.denoised_smoothing.chains:
        problems += [f"report.md lacks the chains' table at σ = {s:g}" for s in params.sigmas
                     if f"### σ = {s:g}" not in report]
    return problems


def missing_outputs(workspace: Path, lock: dict) -> list[str]:
    return [f"{name}: output {out['path']} is missing" for name, entry in lock.get("stages", {}).items()
            for out in entry.get("outs", []) if not (workspace / out["path"]).exists()]


def check_outputs(workspace: Path, params: Params, ran: dict[str, float]) -> list[str]:
    """What is missing: a stage that did not run, an output of dvc.lock that does not exist, a report section,
    a stage `dvc status` still calls changed."""
    stages = dvc(workspace, "stage", "list", "--name-only").stdout.split()
    problems = [f"stage {name} did not run" for name in stages if name not in ran]
    problems += missing_outputs(workspace, yaml.safe_load((workspace / "dvc.lock").read_text(encoding="utf-8")))
    status = dvc(workspace, "status")
    if "up to date" not in status.stdout:
        problems.append("dvc status is not clean after the run: " + " ".join(status.stdout.split())[:300])
    report = workspace / "results/report/report.md"
    return problems + missing_sections(report.read_text(encoding="utf-8") if report.is_file() else "", params)


def check_raw_dependency(workspace: Path, params: Params) -> list[str]:
    """Change one raw file (then put it back): `dvc status` must name the prepare stage."""
    raw = workspace / params.data.root
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    if not files:
        return [f"no raw files under {params.data.root}"]
    target = files[len(files) // 2]
    original = target.read_bytes()
    target.write_bytes(original + b"\0")
    try:
        status = dvc(workspace, "status", "prepare")
    finally:
        target.write_bytes(original)
    if "prepare" not in status.stdout or "changed deps" not in status.stdout:
        return [f"after changing {target.relative_to(workspace)}, `dvc status` does not name prepare: "
                + " ".join(status.stdout.split())[:300]]
    return []


def import_command(file: str, options: list[str], workspace: Path) -> list[str]:
    """The preset header's import step, on the fabricated file."""
    return ["dmae", "import-checkpoint", str(workspace / "released" / Path(file).name), *options]


def load_preset(path: Path) -> tuple[str, dict, Params]:
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    return text, raw, parse_params(raw, source=str(path))

