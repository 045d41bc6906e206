"""Reliability, concurrency: two `dvc repro` in one project at once. DVC locks the repository and, while a stage
runs, its outputs (.dvc/tmp/rwlock): the second gets DVC's lock error at once (non-zero exit, a message naming
the busy output and the PID holding it) and changes nothing; the first completes and leaves a consistent
dvc.lock. (`dvc --wait-for-lock` waits for the repository lock only, not for a busy output: no queue either.)

Runs in a throw-away DVC project with one stage that blocks until the test releases it (no timing guesses).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
STAGE = """\
import pathlib, time
pathlib.Path("started").write_text("1")
for _ in range(1200):  # until the test releases it (at most 2 minutes)
    if pathlib.Path("release").exists():
        break
    time.sleep(0.1)
pathlib.Path("out.txt").write_text("done\\n")
"""


def dvc(project: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=project, capture_output=True, text=True, timeout=300, env=ENV, **kwargs)


ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}


@pytest.fixture
def project(tmp_path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=ENV)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    assert dvc(tmp_path, "config", "core.analytics", "false").returncode == 0
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"slow": {
        "cmd": f"{sys.executable} stage.py", "deps": ["stage.py"], "outs": ["out.txt"]}}}))
    return tmp_path


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"first dvc repro ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the stage of the first dvc repro never started")
        time.sleep(0.05)


def test_second_repro_gets_the_lock_error_and_the_first_completes(project):
    first = subprocess.Popen([DVC, "repro"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=ENV)
    try:
        wait_for(project / "started", first)
        second = dvc(project, "repro")
        assert first.poll() is None  # the second gave up while the first still held the lock
        assert second.returncode != 0
        assert "out.txt' is busy, it is being blocked by" in second.stderr or "Unable to acquire lock" in second.stderr
        assert f"PID {first.pid}" in second.stderr or "another DVC process is running" in second.stderr
        assert "Traceback" not in second.stderr
        assert not (project / "out.txt").exists() and not (project / "dvc.lock").exists()  # it changed nothing

        (project / "release").write_text("1")
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert (project / "out.txt").read_text() == "done\n"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["slow"]["outs"][0]["path"] == "out.txt"
    again = dvc(project, "repro")  # and a later run finds it done
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout + again.stderr
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_killed_repro_leaves_no_stale_lock(project):
    """A crash (SIGKILL to dvc and its stage) mid-stage: DVC drops the dead PID's locks and the rerun completes."""
    first = subprocess.Popen([DVC, "repro"], cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=ENV, start_new_session=True)
    try:
        wait_for(project / "started", first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert not (project / "out.txt").exists()
    (project / "release").write_text("1")
    rerun = dvc(project, "repro")
    assert rerun.returncode == 0, rerun.stderr
    assert (project / "out.txt").read_text() == "done\n"
    status = dvc(project, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
