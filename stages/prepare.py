"""`dmae prepare`: bring the configured data set into the prepared format the other stages read."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from dmae.data import prepare_dataset
from stages import paths, resolved
from stages.common import PARAMS_OPTION, setup, user_errors, write_settings


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(paths.PREPARED, help="Where the prepared data set goes."),
) -> None:
    """Prepare data.dataset (digits ships with scikit-learn; cifar10 and imagenet are read from data.root).

    Writes OUT/{train,val,test} (tensors, or an image index for ImageNet), OUT/meta.json and the settings used.
    ImageNet's images are decoded once here, in DMAE_WORKERS processes (every core when 0): a file that does not
    decode stops the pipeline before any training.
    """
    params, runtime, _ = setup(params_path)
    meta = prepare_dataset(params.data.dataset, out, workers=runtime.workers or os.cpu_count() or 1,
                           **params.data.prepare_options())
    write_settings(out / "settings.json", resolved.prepare(params))
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("splits", {}).items())
    print(f"prepared {params.data.dataset}: {sizes}")
