"""`dmae certify-chain`: certify a denoise-then-classify chain (denoised smoothing) at one sigma."""

from __future__ import annotations

from pathlib import Path

import typer
from torch.utils.data import Subset

from dmae.data import load_split, read_meta
from dmae.defense.chain import Denoised
from dmae.models.autoencoder import load_autoencoder
from dmae.models.classifier import load_classifier
from dmae.settings import PER_SIGMA
from dmae.smoothing import Smooth, check_certify_args
from dmae.smoothing.certify import certify_split
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from stages import paths, resolved
from stages.common import (PARAMS_OPTION, check_prepared, check_sigma, setup, user_errors, work_state,
                           write_settings)


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level (one of params `sigmas`)."),
    chain: str = typer.Option(..., help="Which chain (a key of params denoised_smoothing.chains)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (its test split is certified)."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: the chain's denoiser and classifier are read."),
    out: Path = typer.Option(None, help="Output TSV [default: results/chains/CHAIN/sigma-SIGMA.tsv]."),
) -> None:
    """Certify every denoised_smoothing.test_every-th example that `dmae certify` certifies through the chain's
    base classifier: the noisy sample, reconstructed in one step by the frozen denoiser at SIGMA, labelled by the
    classifier. Settings and TSV as `dmae certify` (idx counts the chain's examples: `dmae certify`'s idx * the
    chain's test_every)."""
    params, runtime, device = setup(params_path, example_parallel=True)
    check_sigma(sigma, params.sigmas)
    chains, c = params.denoised_smoothing.chains, params.certify
    if chain not in chains:
        raise UserError(f"--chain {chain!r} is not a key of params denoised_smoothing.chains ({', '.join(chains)})")
    check_certify_args(n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size)
    spec = chains[chain]
    device = dist.init_from_env(device)
    check_prepared(data, params)
    meta = read_meta(data)
    cfg = params.model.config(meta)
    denoiser_dir = paths.pretrained(spec.denoiser, models)
    classifier_dir = (paths.chain_classifier(sigma, models) if spec.classifier == PER_SIGMA
                      else paths.defense_classifier(spec.classifier, models))
    how = params.denoiser_settings(spec.denoiser)
    base = Denoised(load_autoencoder(denoiser_dir, cfg),
                    load_classifier(classifier_dir, expect_classes=meta["num_classes"], expect_cfg=cfg), sigma,
                    how.norm_pix_loss, how.reconstruct_groups).to(device)
    smooth = Smooth(base, meta["num_classes"], sigma, seed=c.seed, precision=c.precision)
    test = load_split(data, "test")
    examples = Subset(test, range(0, len(test), c.test_every * params.denoised_smoothing.test_every))
    out = out or paths.chain_certification(chain, sigma)
    settings = resolved.certify_chain(params, sigma, chain)
    with work_state("certify", out, settings, [data, denoiser_dir, classifier_dir]) as state:
        if certify_split(smooth, examples, out, work_dir=state.folder, timing=paths.chain_timing(chain, sigma),
                         progress=runtime.progress, n0=c.n0, n=c.n if c.method == "cohen" else c.n_max,
                         alpha=c.alpha, batch_size=c.batch_size, method=c.method, radii=params.report.radii):
            write_settings(out.with_suffix(".settings.json"), settings)
        state.finish()
