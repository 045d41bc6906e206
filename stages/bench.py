"""`dmae bench`: certification and training throughput against the device's peak (not a pipeline stage)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from dmae.settings import Runtime, load_params, load_runtime
from dmae.util.errors import UserError
from dmae.util.progress import say
from stages.common import PARAMS_OPTION, user_errors
from tools.bench import TARGETS, rich_table, run_bench, write_report


def _device(name: str | None, runtime: Runtime) -> torch.device:
    try:
        return (runtime if name is None else Runtime(device=name)).torch_device()
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None


@user_errors
def main(
    preset: str = typer.Option("tiny", help=f"What to measure: {', '.join(TARGETS)} (tiny: the default digits "
                                            "model, 1x16x16, patch 4; base: ViT-B/16 at 3x224x224)."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized: a few samples and steps, one round."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: DMAE_DEVICE, else cuda if available)."),
    compile: bool = typer.Option(False, "--compile", help="Also measure the engine under torch.compile (and CUDA "
                                                          "graphs on CUDA); compiling takes a while."),
    n: int = typer.Option(None, min=1, help="Certification samples N (default: per preset)."),
    n0: int = typer.Option(None, min=1, help="Selection samples N0 (default: per preset)."),
    images: int = typer.Option(None, min=1, help="Images certified per round (default: per preset)."),
    batch_size: int = typer.Option(None, min=1, help="Certification batch size (default: per preset)."),
    train_batch: int = typer.Option(None, min=1, help="Training batch size (default: per preset)."),
    rounds: int = typer.Option(None, min=1, help="Timed rounds; each figure is the best (default: per preset)."),
    out: Path = typer.Option(Path("bench.md"), help="Markdown table; the full report goes beside it as .json."),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """Measure certification (the engine and a locuslab/smoothing-style loop), pretraining and fine-tuning steps,
    and a large matrix product, side by side in one run; print the table and write it to OUT. The training steps
    use the pretrain and finetune settings of the params file at the bench's batch size."""
    if preset not in TARGETS:
        raise UserError(f"--preset {preset!r}: expected one of {', '.join(TARGETS)}")
    params = load_params(params_path)
    runtime = load_runtime()
    torch.set_num_threads(params.cpu_threads)
    overrides = {k: v for k, v in {"n": n, "n0": n0, "images": images, "batch_size": batch_size,
                                   "train_batch": train_batch, "rounds": rounds}.items() if v is not None}
    report = run_bench(preset, params, device=_device(device, runtime), quick=quick, compile=compile,
                       progress=runtime.progress, **overrides)
    Console().print(rich_table(report))
    for path in write_report(report, out):
        say(f"wrote {path}")
