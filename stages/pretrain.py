"""`dmae pretrain`: pretrain the denoising masked autoencoder (DMAE, NIM or MAE by pretrain.task)."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.models.imports import check_init_from
from dmae.settings import MAIN_DENOISER
from dmae.train.pretrain import pretrain_autoencoder
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from stages import paths, resolved
from stages.common import PARAMS_OPTION, check_prepared, setup, user_errors, work_state, write_settings


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (output of `dmae prepare`)."),
    out: Path = typer.Option(None, help="Where the pretrained weights and config go [default: models/pretrain, "
                                        "or models/denoisers/VARIANT]."),
    results: Path = typer.Option(None, help="Where the loss curve and figure go [default: results/pretrain, or "
                                            "results/denoisers/VARIANT]."),
    variant: str = typer.Option(None, help="Pretrain the denoiser variant of this name (a key of params "
                                           "defense.denoisers): `pretrain` with the variant's overrides."),
) -> None:
    """Pretrain on the prepared training split; resumes after an interruption.

    Writes OUT/model.safetensors + config.json + settings.json, RESULTS/metrics.tsv (loss per epoch, a DVC
    plot) and RESULTS/reconstructions.png|svg (held-out images: clean / corrupted / reconstructed).
    With pretrain.epochs 0, OUT holds the pretrain.init_from weights as they are (a released model, say).
    """
    params, runtime, device = setup(params_path)
    device = dist.init_from_env(device)
    if variant is not None and variant not in params.defense.denoisers:
        raise UserError(f"--variant {variant!r} is not a key of params defense.denoisers "
                        f"({', '.join(params.defense.denoisers)})")
    cfg = params.denoiser_settings(variant) if variant else params.pretrain
    name = variant or MAIN_DENOISER
    out, results = out or paths.pretrained(name), results or paths.pretrain_results(name)
    check_prepared(data, params)
    settings = resolved.pretrain(params, variant)
    if cfg.init_from:
        check_init_from(cfg.init_from)
    inputs = [data] + ([Path(cfg.init_from)] if cfg.init_from else [])
    with work_state("pretrain", out, settings, inputs) as state:
        pretrain_autoencoder(cfg, params.model, data, out=out, results=results, device=device,
                             state_path=state.path("state.pt"), workers=runtime.workers, progress=runtime.progress)
        if dist.is_main():
            write_settings(out / "settings.json", settings)
        state.finish()
