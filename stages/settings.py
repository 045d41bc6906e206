"""`dmae settings`: write the resolved settings of every stage, the files the expensive stages depend on."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.util.io import write_json
from stages import paths, resolved
from stages.common import PARAMS_OPTION, setup, user_errors


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(paths.SETTINGS, help="Folder of the settings files."),
) -> None:
    """Validate params.yaml and write OUT/<stage>.json for every stage and matrix item: exactly the settings its
    result depends on. dvc.yaml makes each stage depend on its file instead of on params sections, so a stage
    reruns only when its own resolved settings change (a denoiser that overrides pretrain.mask_ratio does not
    rerun when pretrain.mask_ratio changes)."""
    params, _, _ = setup(params_path)
    files = resolved.every_stage(params)
    for stale in set(p.name for p in out.glob("*.json")) - set(files) if out.is_dir() else ():
        (out / stale).unlink()
    for name, settings in files.items():
        write_json(out / name, settings)
