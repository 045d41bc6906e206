"""The `dmae` command: one sub-command per pipeline stage (what `dvc repro` runs, runnable by hand), plus the
commands beside the pipeline (import-checkpoint, use-preset, bench).

`main` (the console script) imports only the module of the command it runs: the stages import different parts of
the library (each costs seconds), and `dvc repro` starts one process per stage. `app` holds every command.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

COMMANDS = {  # command -> module:function
    "settings": "stages.settings:main",
    "prepare": "stages.prepare:main",
    "pretrain": "stages.pretrain:main",
    "finetune": "stages.finetune:main",
    "certify": "stages.certify:main",
    "certify-merge": "stages.certify:merge",
    "finetune-defense": "stages.finetune_defense:main",
    "finetune-chain": "stages.finetune_chain:main",
    "certify-chain": "stages.certify_chain:main",
    "attack": "stages.attack:main",
    "report": "stages.report:main",
    "import-checkpoint": "stages.import_checkpoint:main",
    "use-preset": "stages.use_preset:main",
    "rehearse": "stages.rehearse:main",
    "bench": "stages.bench:main",
    "bench-methods": "stages.bench:methods",
    "bench-denoisers": "stages.bench:denoisers",
    "bench-input": "stages.bench:input_pipeline",
    "bench-pipeline": "stages.bench:pipeline",
}
HELP = ("dmae: denoising (masked) autoencoders for certified and adversarial robustness.\n\n"
        "Each command is one DVC stage; `dvc repro` runs them in order. Settings come from params.yaml; "
        "DMAE_DEVICE, DMAE_NPROC, DMAE_WORKERS, DMAE_PROGRESS and DMAE_STATE_DIR tune the machine.")


def build(names) -> typer.Typer:
    """A Typer app with the named commands."""
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      rich_markup_mode=None,  # help is plain text: "[default: ...]" and [brackets] print as written
                      context_settings={"max_content_width": 120})
    app.callback()(lambda: None)  # a group even with one command: `dmae certify ...` keeps its name
    for name in names:
        module, function = COMMANDS[name].split(":")
        app.command(name)(getattr(importlib.import_module(module), function))
    return app


TRAINING = {"pretrain", "finetune", "finetune-defense", "finetune-chain"}  # DMAE_NPROC processes (default 1)
EXAMPLE_PARALLEL = {"certify", "certify-chain", "attack"}  # default: every core (CPU) or every GPU


def processes(command: str) -> int:
    """How many processes run `command`: DMAE_NPROC when set; else, for the example-parallel stages, one per
    CPU core (one thread each) or one per GPU; else 1."""
    nproc = os.environ.get("DMAE_NPROC", "")
    if nproc:
        if not nproc.isdigit() or int(nproc) < 1:
            print(f"error: DMAE_NPROC={nproc!r}: expected a whole number of processes >= 1", file=sys.stderr)
            sys.exit(2)
        return int(nproc)
    if command not in EXAMPLE_PARALLEL:
        return 1
    device = os.environ.get("DMAE_DEVICE", "auto")
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    if device.startswith("cuda"):  # cuda:N, or CUDA missing (the stage says so)
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launch_processes(command: str) -> None:
    """Replace this process by torchrun running the same command in `processes(command)` processes when that is
    more than one (gloo on CPU, one GPU each on CUDA). Under torchrun, nothing."""
    if command not in TRAINING | EXAMPLE_PARALLEL or "LOCAL_RANK" in os.environ:
        return
    if (nproc := processes(command)) > 1:
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={nproc}", "-m", "stages.cli", *sys.argv[1:]])


def main() -> None:
    wanted = [sys.argv[1]] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else list(COMMANDS)
    if len(wanted) == 1:
        launch_processes(wanted[0])
    build(wanted)()


def __getattr__(name: str):
    if name == "app":  # every command (tests, `python -c "from stages.cli import app"`); built on first use
        return build(COMMANDS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # `python -m stages.cli ...`, e.g. under torchrun where no `dmae` script is installed
    main()
