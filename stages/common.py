"""What every stage shares: reading params, runtime knobs, the user-error boundary, settings, work in progress."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import typer

import dmae
from dmae.settings import Params, Runtime, load_params, load_runtime
from dmae.util.errors import UserError
from dmae.util.io import write_json
from dmae.util.progress import say
from dmae.util.state import WorkState, code_version, content_hash
import stages

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", help="The params file to read.")
STATE_ROOT = Path(".dmae-state")  # work in progress: outside DVC outs, so `dvc repro` does not delete it
INTERRUPTED = "interrupted: the last checkpoint is kept; rerun the same command to resume"


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
            say(f"error: {exc}", style="bold red")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say(INTERRUPTED, style="yellow")
            raise typer.Exit(130) from None
    return wrapper


EXAMPLE_PARALLEL_THREADS = 1  # CPU threads of every process of an example-parallel stage (see `setup`)


def setup(params_path: Path, example_parallel: bool = False) -> tuple[Params, Runtime, torch.device]:
    """Validate params and environment before any work; set the CPU threads: params cpu_threads, or for the
    example-parallel stages (certify, certify-chain, attack) one per process whatever the process count, so that
    their results do not depend on how many processes share the examples."""
    params = load_params(params_path)
    runtime = load_runtime()
    device = runtime.torch_device()
    torch.set_num_threads(EXAMPLE_PARALLEL_THREADS if example_parallel else params.cpu_threads)
    return params, runtime, device


def check_sigma(sigma: float, sigmas: list[float]) -> None:
    if sigma not in sigmas:
        raise UserError(f"--sigma {sigma} is not one of params sigmas {sigmas}")


def check_prepared(data: Path, params: Params) -> None:
    """The prepared data set must exist and be the one params.data describes (a stale data/prepared is refused)."""
    if not (data / "meta.json").is_file():
        raise UserError(f"{data / 'meta.json'} not found; run the data preparation stage first (dvc repro, or the "
                        f"dmae prepare command)")
    path = data / "settings.json"
    if not path.is_file():  # prepared by the library directly: nothing recorded to compare
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("data", {})
    except (ValueError, AttributeError):
        raise UserError(f"{path}: not the settings file `dmae prepare` writes; prepare the data again") from None
    wanted = params.data.model_dump(mode="json")
    changed = [f"data.{k} {recorded.get(k)!r} (params: {v!r})" for k, v in wanted.items() if recorded.get(k) != v]
    if changed:
        raise UserError(f"{data} was prepared with other data settings: {'; '.join(changed)}; run `dmae prepare` "
                        f"(or `dvc repro`) first")


def write_settings(path: Path, settings: dict) -> None:
    """The resolved settings a stage ran with, beside its outputs (no paths or times: DVC hashes this)."""
    write_json(path, settings)


def work_state(stage: str, output: Path, settings: dict, inputs: list[Path]) -> WorkState:
    """The work in progress of `output` (use as a context manager): locked, and resumed only by a run with the
    same settings, the same inputs (content hashes of the models and data it reads) and the same code.

    An input that does not exist is a UserError here, before anything (a lock, a fingerprint) is written."""
    if missing := [p for p in inputs if not Path(p).exists()]:
        raise UserError(f"{missing[0]} not found: {output} is made from it; run the stages before this one "
                        f"first (`dvc repro` runs them in order)")
    fingerprint = {"settings": settings, "inputs": {str(p): content_hash(p) for p in inputs},
                   "code": code_version(Path(dmae.__file__).parent, Path(stages.__file__).parent)}
    return WorkState(Path(os.environ.get("DMAE_STATE_DIR", STATE_ROOT)), stage, output, fingerprint)
