"""Reliability, interruption: the real `dmae` commands, killed and rerun, end exactly as an uninterrupted run.

Each stage runs in a subprocess on tiny settings. SIGKILL (no chance to clean up) lands right after an epoch
checkpoint, or mid-epoch, or after some certified rows; rerunning the same command resumes and must give the
same bytes: model.safetensors, config/settings JSON, metrics and figures of training; the certification TSV.
SIGTERM and SIGINT must end the command with exit 130 and one message, keep a resumable checkpoint, and the rerun
completes to the same result. While a command runs, every output that is visible under its final name is checked
to be complete (outputs are written through dmae.util.io.atomic_path).

All slow: each test starts 2-3 processes (mostly import time on a small CPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml
from safetensors.torch import load_file

from dmae.smoothing.certify import HEADER, read_certify_tsv
from dmae.util.state import load_state
from tests.conftest import params_with

pytestmark = pytest.mark.slow

# TINY (tests/conftest.py) made smaller still: 8x8 inputs, a 287-image training split, 4 epochs of ~0.3 s, and a
# certification of 24 test images slow enough (N = 1000) to be caught half way.
SETTINGS = {
    "sigmas": [0.25, 0.5],
    "cpu_threads": 1,
    "data": {"image_size": 8, "test_every": 15, "val_fraction": 0.8},
    "model": {"preset": "tiny", "img_size": 8, "patch_size": 4},
    "pretrain": {"epochs": 4, "batch_size": 64, "warmup_epochs": 1},
    "finetune": {"epochs": 4, "batch_size": 64, "warmup_epochs": 0},
    "certify": {"n0": 20, "n": 1000, "batch_size": 250},
}
SIGMA = "0.25"
STAGES = {  # command, inputs it needs, outputs it writes
    "pretrain": (["pretrain"], ["data/prepared"],
                 ["models/pretrain/model.safetensors", "models/pretrain/config.json", "models/pretrain/settings.json",
                  "results/pretrain/metrics.tsv", "results/pretrain/reconstructions.png",
                  "results/pretrain/reconstructions.svg"]),
    "finetune": (["finetune", "--sigma", SIGMA], ["data/prepared", "models/pretrain"],
                 [f"models/finetune/sigma-{SIGMA}/model.safetensors", f"models/finetune/sigma-{SIGMA}/config.json",
                  f"models/finetune/sigma-{SIGMA}/settings.json", f"results/finetune/sigma-{SIGMA}/metrics.tsv"]),
    "certify": (["certify", "--sigma", SIGMA], ["data/prepared", f"models/finetune/sigma-{SIGMA}"],
                [f"results/certify/sigma-{SIGMA}.tsv", f"results/certify/sigma-{SIGMA}.settings.json"]),
}
INTERRUPTED = "interrupted: the last checkpoint is kept; rerun the same command to resume"
DMAE = shutil.which("dmae") or str(Path(sys.executable).with_name("dmae"))


def squeezed(text: str) -> str:
    return "".join(text.split())


# -- watching a running command ------------------------------------------------------------------------------------
def complete(path: Path) -> str | None:
    """Why the file at `path` is not a complete output, or None if it is."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".safetensors"):
        try:
            load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            return f"unreadable safetensors ({exc})"
    elif name.endswith(".json"):
        try:
            json.loads(data)
        except ValueError as exc:
            return f"invalid JSON ({exc})"
    elif name.endswith(".tsv"):
        lines = data.decode().split("\n")
        if lines[-1] != "" or len({len(line.split("\t")) for line in lines[:-1]}) != 1:
            return "torn TSV"
        if name.startswith("sigma-") and lines[0] != HEADER:
            return "TSV without its header"
    elif name.endswith(".png"):
        if not (data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")):
            return "truncated PNG"
    elif name.endswith(".svg"):
        if not data.rstrip().endswith(b"</svg>"):
            return "truncated SVG"
    return None


@dataclass
class Run:
    returncode: int
    stderr: str
    signalled: bool
    incomplete: list[str] = field(default_factory=list)  # outputs seen incomplete under their final name

    @property
    def log(self) -> str:
        return " ".join(self.stderr.split())


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell may have set it to ignored


def run(project: Path, stage: str, *, stop_when: Callable[[str, Path], bool] | None = None, delay: float = 0.0,
        sig: int = signal.SIGKILL, timeout: float = 300) -> Run:
    """Run `dmae <stage>` in `project`; send `sig` once stop_when(stderr so far, project) holds (after `delay`)."""
    command, _, outputs = STAGES[stage]
    env = {**os.environ, "DMAE_PROGRESS": "0", "DMAE_DEVICE": "cpu",
           "DMAE_STATE_DIR": str(project / "state"), "COLUMNS": "200"}
    proc = subprocess.Popen([DMAE, *command], cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_restore_sigint)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    seen: dict[str, tuple] = {}
    incomplete: list[str] = []
    signalled, deadline = False, time.monotonic() + timeout
    while proc.poll() is None:
        for rel in outputs:  # whatever is visible under a final name must be complete
            try:
                st = (project / rel).stat()
            except FileNotFoundError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen.get(rel) != key:
                seen[rel] = key
                try:
                    problem = complete(project / rel)
                except FileNotFoundError:
                    problem = None  # replaced between stat and read: the next poll sees the new file
                if problem:
                    incomplete.append(f"{rel}: {problem}")
        if not signalled and stop_when is not None and stop_when("".join(chunks), project):
            time.sleep(delay)
            proc.send_signal(sig)
            signalled = True
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dmae {stage} did not finish in {timeout} s")
        time.sleep(0.01)
    reader.join(timeout=10)
    return Run(proc.returncode, "".join(chunks), signalled, incomplete)


def after_epoch(epoch: int) -> Callable[[str, Path], bool]:
    """True once the log says epoch `epoch` is done (it is logged right after its checkpoint is saved)."""
    return lambda log, project: re.search(rf"epoch {epoch}/\d+:", log) is not None


def certify_work(project: Path) -> Path:
    """The certification work file, in the stage's work-in-progress folder (state/certify/<output>/)."""
    found = list((project / "state" / "certify").glob("*/work.tsv"))
    return found[0] if found else project / "state" / "certify" / "none" / "work.tsv"


def after_rows(rows: int) -> Callable[[str, Path], bool]:
    """True once the certification work file holds `rows` finished rows."""
    def check(log: str, project: Path) -> bool:
        try:
            text = certify_work(project).read_text()
        except FileNotFoundError:
            return False
        return text.count("\n") - 2 >= rows
    return check


# -- the reference: one uninterrupted run of each stage --------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("reference")
    (project / "params.yaml").write_text(yaml.safe_dump(params_with(SETTINGS)))
    prepared = subprocess.run([DMAE, "prepare"], cwd=project, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "DMAE_PROGRESS": "0"})
    assert prepared.returncode == 0, prepared.stderr
    for stage in STAGES:
        done = run(project, stage)
        assert done.returncode == 0, done.stderr
        assert not done.incomplete, done.incomplete
    assert not (project / "state").exists() or not any((project / "state").rglob("state.pt"))
    return project


def fresh_project(reference: Path, tmp_path: Path, stage: str) -> Path:
    """A project holding the params and the inputs of `stage`, copied from the reference run."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(reference / "params.yaml", project / "params.yaml")
    for rel in STAGES[stage][1]:
        shutil.copytree(reference / rel, project / rel)
    return project


def assert_same_outputs(reference: Path, project: Path, stage: str) -> None:
    for rel in STAGES[stage][2]:
        got, want = project / rel, reference / rel
        assert got.is_file(), rel
        assert got.read_bytes() == want.read_bytes(), f"{rel} differs from the uninterrupted run"
        if rel.endswith(".tsv") and "certify" in rel:
            read_certify_tsv(got)
    for rel in {str(Path(r).parent) for r in STAGES[stage][2] if r.startswith("models/")}:
        names = sorted(p.name for p in (project / rel).iterdir())  # no temporary files left in a DVC out folder
        assert names == sorted(p.name for p in (reference / rel).iterdir()), names
    assert not any((project / "state").rglob("state.pt")) if (project / "state").exists() else True


def assert_no_final_outputs(project: Path, stage: str) -> None:
    """After an interruption, the stage's model (or TSV) is not there: only complete runs write it."""
    for rel in STAGES[stage][2]:
        if rel.startswith("models/") or "certify" in rel:
            assert not (project / rel).exists(), rel


def state_epoch(project: Path, stage: str) -> int:
    files = list((project / "state" / stage).glob("*/state.pt"))
    assert len(files) == 1, files
    return load_state(files[0])["epoch"]


# -- SIGKILL -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_killed_twice_resumes_bit_identical(reference, tmp_path, stage):
    project = fresh_project(reference, tmp_path, stage)
    first = run(project, stage, stop_when=after_epoch(1))  # right after the epoch-1 checkpoint
    assert first.signalled and first.returncode == -signal.SIGKILL, first.stderr
    assert_no_final_outputs(project, stage)
    assert state_epoch(project, stage) >= 1

    second = run(project, stage, stop_when=after_epoch(2), delay=0.1)  # mid-way through a later epoch
    assert second.signalled and second.returncode == -signal.SIGKILL, second.stderr
    assert "resuming" in second.log and "after epoch 1" in second.log
    assert_no_final_outputs(project, stage)
    resumed_from = state_epoch(project, stage)
    assert resumed_from >= 2

    last = run(project, stage)
    assert last.returncode == 0, last.stderr
    assert f"after epoch {resumed_from}" in last.log
    for r in (first, second, last):
        assert not r.incomplete, r.incomplete
    assert_same_outputs(reference, project, stage)


def test_certify_killed_twice_resumes_to_the_same_rows(reference, tmp_path):
    project = fresh_project(reference, tmp_path, "certify")
    first = run(project, "certify", stop_when=after_rows(3))
    partial = certify_work(project)
    assert first.signalled and first.returncode == -signal.SIGKILL, first.stderr
    assert_no_final_outputs(project, "certify")
    rows_first = partial.read_text().count("\n") - 2
    second = run(project, "certify", stop_when=after_rows(rows_first + 5))
    assert second.signalled and second.returncode == -signal.SIGKILL, second.stderr
    assert_no_final_outputs(project, "certify")
    kept = [line.rsplit("\t", 1)[0] for line in partial.read_text().split("\n")[2:-1]]  # without the seconds
    last = run(project, "certify")
    assert last.returncode == 0, last.stderr
    for r in (first, second, last):
        assert not r.incomplete, r.incomplete
    assert not partial.exists()
    assert_same_outputs(reference, project, "certify")
    final = (project / f"results/certify/sigma-{SIGMA}.tsv").read_text().splitlines()
    assert set(kept) <= {line for line in final}  # finished rows are kept as they were


# -- SIGTERM and SIGINT --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, sig", [
    ("pretrain", signal.SIGTERM),
    ("finetune", signal.SIGINT),
    ("certify", signal.SIGTERM),
    ("certify", signal.SIGINT),
], ids=["pretrain-SIGTERM", "finetune-SIGINT", "certify-SIGTERM", "certify-SIGINT"])
def test_signal_exits_130_keeps_a_checkpoint_and_resumes(reference, tmp_path, stage, sig):
    project = fresh_project(reference, tmp_path, stage)
    stop = after_rows(3) if stage == "certify" else after_epoch(1)
    stopped = run(project, stage, stop_when=stop, sig=sig)
    assert stopped.signalled
    assert stopped.returncode == 130, stopped.stderr
    assert squeezed(INTERRUPTED) in squeezed(stopped.stderr) and "Traceback" not in stopped.stderr
    assert_no_final_outputs(project, stage)
    if stage == "certify":
        assert certify_work(project).read_text().count("\n") - 2 >= 3
    else:
        assert state_epoch(project, stage) >= 1
    rerun = run(project, stage)
    assert rerun.returncode == 0, rerun.stderr
    if stage != "certify":
        assert "resuming" in rerun.log
    assert not stopped.incomplete and not rerun.incomplete
    assert_same_outputs(reference, project, stage)
