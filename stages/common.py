"""What every stage shares: reading params, runtime knobs, the user-error boundary, writing settings."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import typer

from dmae.settings import Params, Runtime, load_params, load_runtime
from dmae.util.errors import UserError
from dmae.util.io import dumps_json, write_json
from dmae.util.progress import console
from dmae.util.seeding import derive_seed

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")
STATE_ROOT = Path(".dmae-state")  # resume checkpoints: outside DVC outs, so `dvc repro` does not delete them


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler's preemption) stops like Ctrl-C: cleanly, checkpoint kept


def user_errors(fn: Callable) -> Callable:
    """Print a UserError as one clear message and exit 2; anything else is a bug and keeps its traceback.

    SIGINT and SIGTERM end the stage with exit 130 and a message; the last checkpoint stays for the rerun.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: the last checkpoint is kept; rerun the same command to resume[/]")
            raise typer.Exit(130) from None
    return wrapper


def setup(params_path: Path) -> tuple[Params, Runtime, torch.device]:
    """Validate params and environment before any work; configure threads."""
    params = load_params(params_path)
    runtime = load_runtime()
    device = runtime.torch_device()
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    return params, runtime, device


def resolved(params: Params, sections: list[str], **extra) -> dict:
    """The named params sections as plain JSON-able data, plus stage-specific extras (e.g. the sigma)."""
    out = {}
    for name in sections:
        value = getattr(params, name)
        out[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return {**out, **extra}


def check_sigma(sigma: float, sigmas: list[float]) -> None:
    if sigma not in sigmas:
        raise UserError(f"--sigma {sigma} is not one of params sigmas {sigmas}")


def write_settings(path: Path, settings: dict) -> None:
    """The resolved settings a stage ran with, beside its outputs (no paths or times: DVC hashes this)."""
    write_json(path, settings)


def state_path(stage: str, settings: dict) -> Path:
    """Resume file for a stage, keyed by a hash of its settings, so a changed param never resumes stale work."""
    digest = f"{derive_seed(dumps_json(settings)):016x}"
    return Path(os.environ.get("DMAE_STATE_DIR", STATE_ROOT)) / stage / digest / "state.pt"


def discard_state(state_path: Path) -> None:
    """Remove a finished stage's resume folder."""
    shutil.rmtree(state_path.parent, ignore_errors=True)
