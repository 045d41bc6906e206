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


DISTRIBUTED = {"pretrain", "finetune", "certify", "finetune-defense", "finetune-chain", "certify-chain"}


def launch_processes(command: str) -> None:
    """With DMAE_NPROC > 1, replace this process by torchrun running the same command in that many processes
    (the training and certification stages; 1 GPU each on CUDA, gloo on CPU). Under torchrun, nothing."""
    nproc = os.environ.get("DMAE_NPROC", "1")
    if command not in DISTRIBUTED or "LOCAL_RANK" in os.environ or nproc in ("", "1"):
        return
    if not nproc.isdigit() or int(nproc) < 1:
        print(f"error: DMAE_NPROC={nproc!r}: expected a whole number of processes >= 1", file=sys.stderr)
        sys.exit(2)
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
