"""Work in progress saved for resume (training checkpoints, certification rows, finished attack rows), never a stage
output: the folder of one output (`WorkState`, keyed by what the work depends on and locked while in use), and
its files.

Written atomically with `torch.save`; read with `torch.load(weights_only=True)`, so a state file can hold tensors
and plain containers but never makes the loader call code.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from dmae.util import distributed as dist
from dmae.util.errors import UserError
from dmae.util.io import atomic_path, write_json
from dmae.util.progress import log


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or None if there is none; a damaged or unsafe file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt resume file must not be trusted or silently used
        unsafe = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if unsafe:  # torch's own text suggests weights_only=False: exactly what must not be done here
            reason = (f"refused: loading it would call or build {unsafe.group(1)}; a pickle like this can run "
                      f"arbitrary code, so it is never loaded")
        else:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            reason = f"{type(exc).__name__}: {first[:200]}"
        raise UserError(f"{path}: resume state is unreadable ({reason}); delete it to start the stage afresh") \
            from None


def content_hash(path: str | Path) -> str:
    """A hash of what is at `path`: a file's bytes, or a folder's files (relative names and bytes, in sorted
    order, byte code left out); 'missing' when there is nothing."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    else:
        return "missing"
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" if file != path else b"")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def code_version(*folders: Path) -> str:
    """A hash of every Python source file under `folders` (the code whose edits invalidate work in progress)."""
    digest = hashlib.blake2b(digest_size=16)
    for folder in folders:
        for file in sorted(Path(folder).rglob("*.py")):
            digest.update(file.relative_to(folder).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _slug(path: Path) -> str:
    """A readable folder name for an output path, unique per absolute path."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", path.as_posix()).strip("-")[-80:]
    return f"{text}-{hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()}"


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two fingerprints."""
    keys = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class WorkState:
    """The resume folder of one output, `<root>/<stage>/<output>/`, and the lock of that output.

    Entering it takes the lock (a second process on the same output is refused at once, naming the holder's
    pid; a lock left by a killed process does not block, since the kernel releases it with the process), then
    compares the fingerprint of this run (settings, content hashes of the inputs, code version) with the one
    saved by the run that left the folder: if they differ, the folder is discarded with one log line naming
    what changed, so work of other inputs is never resumed. Under torchrun rank 0 does this; every rank may then
    read the folder.
    """

    def __init__(self, root: str | Path, stage: str, output: str | Path, fingerprint: dict):
        self.output, self.fingerprint = Path(output), fingerprint
        key = _slug(self.output)
        self.folder = Path(root) / stage / key
        self.lock_path = Path(root) / "locks" / f"{stage}-{key}.lock"
        self._lock = None

    def path(self, name: str) -> Path:
        return self.folder / name

    def __enter__(self) -> "WorkState":
        if dist.is_main():
            self._acquire()
            self._check_fingerprint()
        dist.barrier()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def finish(self) -> None:
        """The output is complete: its work in progress goes (rank 0)."""
        if dist.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)

    def _acquire(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise UserError(f"{self.output} is being written by another process ({holder}); wait for it to "
                            f"finish, or stop it, before running this again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:200]}\n")
        fh.flush()
        self._lock = fh

    def _check_fingerprint(self) -> None:
        saved_path = self.path("fingerprint.json")
        if saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = {}
            if saved != self.fingerprint:
                changed = ", ".join(changed_keys(saved, self.fingerprint)[:6]) or "its record"
                log(f"{self.output}: discarding the work in progress of an earlier run, made with other "
                            f"inputs ({changed} changed); starting over")
                shutil.rmtree(self.folder)
        elif self.folder.exists():  # work of a version that kept no fingerprint: of unknown inputs
            log(f"{self.output}: discarding work in progress of unknown inputs; starting over")
            shutil.rmtree(self.folder)
        write_json(saved_path, self.fingerprint)
