"""`dmae use-preset`: make one of the paper-scale params files under presets/ the project's params.yaml."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.settings import load_params
from dmae.util.io import atomic_write_text
from dmae.util.progress import say
from stages import paths
from stages.common import user_errors


@user_errors
def main(
    name: str = typer.Argument(..., help="A preset under presets/ (without .yaml), e.g. imagenet-dmae-vit-b."),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="The params file to replace."),
) -> None:
    """Validate presets/NAME.yaml and copy it over params.yaml atomically; then run `dvc repro`.

    Equivalent to `cp presets/NAME.yaml params.yaml`, but refuses an unknown or invalid preset.
    """
    source = paths.preset_file(name)
    load_params(source)
    atomic_write_text(params_path, source.read_text(encoding="utf-8"))
    say(f"{params_path} now holds {source} (`git diff {params_path}` shows what changed); "
                  f"next: `dvc repro`")
