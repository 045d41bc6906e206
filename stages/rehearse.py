"""`dmae rehearse PRESET`: run a paper preset's whole DAG at toy sizes before spending GPU-hours on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import typer
import yaml

from dmae.util.errors import UserError
from dmae.util.progress import log, say
from stages.common import user_errors
from stages import paths
from tools import rehearse
from tools.projection import GPU_FLOPS, gpu_hours, stage_flops


def _table(seconds: dict[str, float], hours: dict[str, float]) -> str:
    names = list(seconds) + [name for name in hours if name not in seconds]
    width = max(map(len, names), default=5) + 2
    lines = [f"{'stage':<{width}}{'seconds here':>14}{'GPU-hours at full scale (estimate)':>38}"]
    for name in names:
        here = f"{seconds[name]:.0f}" if name in seconds else "—"
        full = f"{hours[name]:,.1f}" if name in hours else "—"
        lines.append(f"{name:<{width}}{here:>14}{full:>38}")
    lines.append(f"{'total':<{width}}{sum(seconds.values()):>14.0f}{sum(hours.values()):>38,.0f}")
    return "\n".join(lines)


@user_errors
def main(
    preset: str = typer.Argument(..., help="A preset under presets/ (without .yaml), e.g. imagenet-nim-vit-b."),
    nproc: int = typer.Option(None, min=1, help="Processes per training and example-parallel stage (torchrun; "
                                                "gloo on CPU), the multi-process route of the paper scale "
                                                "[default: each stage's own: 1 for training, one per core for "
                                                "certify, certify_chain and attack]."),
    workspace: Path = typer.Option(None, help="Where the rehearsal runs [default: a new temporary folder]; "
                                              "must not exist yet."),
    keep: bool = typer.Option(False, help="Keep the workspace after a successful rehearsal (a failed one is "
                                          "always kept, to inspect)."),
    estimate: bool = typer.Option(False, help="Only print the preset's projected GPU-hours per stage."),
) -> None:
    """Fabricate what PRESET reads (an ImageNet tree with ImageNet's quirks or a CIFAR-10 archive, the released
    checkpoints its header imports, at their real shapes), shrink only its sizes, run its whole DAG with
    `dvc repro` in a copy of the project, and check the outputs, the report's tables and that a changed raw
    image reruns prepare. Prints each stage's seconds here and its projected GPU-hours at full scale.

    The project's own params.yaml, dvc.lock, data and outputs are never touched. Exit status 1 if a check fails.
    """
    source = paths.preset_file(preset)
    text, raw, params = rehearse.load_preset(source)
    hours = {name: gpu_hours(flops) for name, flops in stage_flops(params).items()}
    if estimate:
        say(f"{preset}: projected GPU-hours at {GPU_FLOPS / 1e12:.0f} TFLOP/s sustained per GPU (README.md, "
            f"\"Paper scale\")\n" + _table({}, hours))
        return
    if workspace is not None and workspace.exists():
        raise UserError(f"--workspace {workspace} exists; name a new folder")
    cores = os.cpu_count() or 1
    threads = max(1, cores // (nproc or 1))
    small, changes = rehearse.shrink(raw, nproc or 1, threads)
    root = Path.cwd()
    workspace = workspace or Path(tempfile.mkdtemp(prefix=f"dmae-rehearse-{preset}-"))
    workspace.mkdir(parents=True, exist_ok=True)
    processes = (f"{nproc} processes x {threads} threads" if nproc
                 else f"training 1 process x {threads} threads, example-parallel stages 1 per core")
    say(f"rehearsing {preset} in {workspace} ({processes} per stage)")
    say("shrunk: " + "; ".join(changes))
    t0 = time.monotonic()
    rehearse.make_workspace(root, workspace)
    (workspace / "params.yaml").write_text(yaml.safe_dump(small, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
    small_params = rehearse.load_preset(workspace / "params.yaml")[2]
    steps = rehearse.import_steps(text)
    for made in rehearse.fabricate_inputs(workspace, small_params, steps):
        say(f"made: {made}")
    env = rehearse.environment(workspace, nproc, threads)
    for file, options in steps:
        command = rehearse.import_command(file, options, workspace)
        say("> " + " ".join(command))
        done = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
        if done.returncode:
            raise UserError(f"the preset's import step failed: {done.stderr.strip()[-500:]}")
    run = rehearse.run_dvc_repro(workspace, env, workspace / "rehearsal.log",
                                 on_stage=lambda name: log(f"stage {name}"))
    problems = [] if run.returncode == 0 else [f"dvc repro failed (exit {run.returncode}); its last lines:\n  "
                                               + "\n  ".join(run.tail)]
    if not problems:
        problems += rehearse.check_outputs(workspace, small_params, run.seconds)
        problems += rehearse.check_raw_dependency(workspace, small_params)
    say(_table(run.seconds, hours))
    say(f"{preset}: {time.monotonic() - t0:.0f} s here; full-scale GPU-hours are estimates at "
        f"{GPU_FLOPS / 1e12:.0f} TFLOP/s sustained per GPU (README.md, \"Paper scale\")")
    if problems:
        say(f"rehearsal FAILED ({len(problems)} problem{'s' if len(problems) > 1 else ''}); workspace kept: "
            f"{workspace} (log: rehearsal.log)", style="bold red")
        for problem in problems:
            say(f"- {problem}")
        raise typer.Exit(1)
    say("rehearsal passed: every stage ran, every output exists, the report has its tables, and a changed raw "
        "file reruns prepare", style="bold green")
    if keep:
        say(f"workspace kept: {workspace}")
    else:
        shutil.rmtree(workspace, ignore_errors=True)
