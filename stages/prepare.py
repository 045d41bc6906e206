"""`dmae prepare`: bring the configured data set into the prepared format the other stages read."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.datasets import prepare_dataset
from stages.common import PARAMS_OPTION, resolved, setup, user_errors, write_settings


def dataset_options(data) -> dict:
    """The prepare options of each data set, from the params `data` section."""
    common = {"val_fraction": data.val_fraction, "seed": data.seed, "test_every": data.test_every}
    if data.dataset == "digits":
        return {**common, "image_size": data.image_size}
    if data.dataset == "cifar10":
        return {**common, "root": data.root, "download": data.download}
    return {**common, "root": data.root, "image_size": data.image_size}


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("data/prepared"), help="Where the prepared data set goes."),
) -> None:
    """Prepare data.dataset (digits ships with scikit-learn; cifar10 and imagenet are read from data.root).

    Writes OUT/{train,val,test} (tensors, or an image index for ImageNet), OUT/meta.json and the settings used.
    """
    params, _, _ = setup(params_path)
    meta = prepare_dataset(params.data.dataset, out, **dataset_options(params.data))
    write_settings(out / "settings.json", resolved(params, ["data"]))
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("splits", {}).items())
    print(f"prepared {params.data.dataset}: {sizes}")
