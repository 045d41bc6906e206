"""The `dmae` command: one sub-command per pipeline stage (what `dvc repro` runs, runnable by hand), plus the
commands beside the pipeline (import-checkpoint, use-preset, bench)."""

from __future__ import annotations

import typer

from stages import (attack, bench, certify, finetune, finetune_defense, import_checkpoint, prepare, pretrain, report,
                    use_preset)

app = typer.Typer(
    help="dmae: denoising (masked) autoencoders for certified and adversarial robustness.\n\n"
         "Each command is one DVC stage; `dvc repro` runs them in order. Settings come from params.yaml; "
         "DMAE_DEVICE, DMAE_WORKERS, DMAE_THREADS and DMAE_PROGRESS tune the machine, never the results.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("prepare")(prepare.main)
app.command("pretrain")(pretrain.main)
app.command("finetune")(finetune.main)
app.command("certify")(certify.main)
app.command("certify-merge")(certify.merge)
app.command("finetune-defense")(finetune_defense.main)
app.command("attack")(attack.main)
app.command("report")(report.main)
app.command("import-checkpoint")(import_checkpoint.main)
app.command("use-preset")(use_preset.main)
app.command("bench")(bench.main)
