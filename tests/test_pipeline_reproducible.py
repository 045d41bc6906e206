"""The committed dvc.lock is reproducible: a reduced pipeline, run by `dvc repro` in two fresh copies of the
project, writes the same hashes for every output (the reduced form of `make repro` in a fresh clone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, TINY, params_with

# The whole pipeline, every stage, on a minute's worth of work: one sigma, one De^3 chain, two denoised-smoothing
# chains, 8x8 digits.
REDUCED = {
    **TINY,
    "sigmas": [0.5],
    "cpu_threads": 1,
    "data": {"image_size": 8, "test_every": 30, "val_fraction": 0.8},
    "model": {"preset": "tiny", "img_size": 8, "patch_size": 4},
    "pretrain": {"epochs": 2, "batch_size": 64, "warmup_epochs": 1},
    "finetune": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0},
    "attack": {"examples": 4, "batch_size": 4, "test_sigmas": [0.0, 0.25], "eot": 1,
               "autoattack": {"versions": ["standard"], "examples": 2, "classifiers": ["dmae"], "test_sigmas": [0.0]},
               "pgd": {"steps": 1}, "square": {"queries": 3}, "figure": "dmae"},
}


def copy_project(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    files = listed.stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    raw = params_with(REDUCED)
    raw["defense"].update(denoisers={}, classifiers={"dmae": {"input": "denoised", "encoder": "dmae",
                                                              "denoiser": "dmae"}},
                          finetune={"consistency": {"enabled": False}, "epochs": 1, "warmup_epochs": 0})
    raw["denoised_smoothing"].update(finetune={"denoiser": "dmae", "encoder": "dmae"}, chains={
        "de3": {"denoiser": "dmae", "classifier": "dmae"},
        "fine_tuned": {"denoiser": "dmae", "classifier": "per_sigma"}})
    (dest / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def start(project: Path) -> subprocess.Popen:
    """`dvc repro` in `project`, with its own copy of the code (PYTHONPATH) and work-in-progress folder."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "DMAE_PROGRESS": "0",
           "DMAE_STATE_DIR": str(project / ".dmae-state"), "PYTHONPATH": str(project)}
    return subprocess.Popen([str(Path(bin_dir) / "dvc"), "repro", "--quiet"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output_hashes(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def test_two_fresh_copies_reproduce_the_same_hashes(tmp_path):
    projects = [copy_project(tmp_path / name) for name in ("a", "b")]
    runs = [start(p) for p in projects]  # side by side: each stage runs on one thread (cpu_threads 1)
    for run in runs:
        log, _ = run.communicate(timeout=900)
        assert run.returncode == 0, log[-3000:]
    first, second = map(output_hashes, projects)
    assert len(first) > 20  # every stage ran, matrix items included
    assert first == second
    lock_a, lock_b = ((p / "dvc.lock").read_text() for p in projects)
    assert lock_a == lock_b  # deps and params included: the lock file itself is the same
