"""`dmae certify`: certify the l2 robustness of the smoothed classifier at one sigma (Cohen et al. CERTIFY)."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.data import load_split, read_meta
from dmae.models.classifier import load_classifier
from dmae.smoothing import Smooth, check_certify_args
from dmae.smoothing.certify import certify_split, merge_shards, shard_path
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from stages import paths
from stages.common import PARAMS_OPTION, check_sigma, resolved, setup, user_errors, write_settings

SECTIONS = ["data", "model", "certify"]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/k, e.g. 0/4") from None
    if not 0 <= i < k:
        raise UserError(f"--shard {text!r}: need 0 <= i < k")
    return i, k


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level (one of params `sigmas`)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (its test split is certified)."),
    model: Path = typer.Option(None, help="Fine-tuned classifier [default: models/finetune/sigma-SIGMA]."),
    out: Path = typer.Option(None, help="Output TSV [default: results/certify/sigma-SIGMA.tsv]."),
    shard: str = typer.Option("0/1", help="Certify only shard i of k (every k-th example from the i-th); "
                                          "merge the shards with `dmae certify-merge`."),
) -> None:
    """Certify every example of the test split with N0, N, alpha from params; resumes after an interruption.

    Writes OUT with one row per example: idx label predict radius correct time (predict -1 = abstain).
    """
    params, runtime, device = setup(params_path)
    check_sigma(sigma, params.sigmas)
    c = params.certify
    check_certify_args(n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size)
    part = parse_shard(shard)
    device = dist.init_from_env(device)
    model, out = model or paths.finetuned(sigma), out or paths.certification(sigma)
    meta = read_meta(data)
    classifier = load_classifier(model, expect_classes=meta["num_classes"],
                                 expect_cfg=params.model.config(meta)).to(device)
    smooth = Smooth(classifier, meta["num_classes"], sigma, seed=c.seed, precision=c.precision)
    whole = certify_split(smooth, load_split(data, "test"), out, n0=c.n0, n=c.n, alpha=c.alpha,
                          batch_size=c.batch_size, shard=part, progress=runtime.progress)
    if whole:
        write_settings(out.with_suffix(".settings.json"), resolved(params, SECTIONS, sigma=sigma))


@user_errors
def merge(
    sigma: float = typer.Option(..., help="Noise level whose shards to merge."),
    shards: int = typer.Option(..., min=1, help="Number of shards k the work was split into."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set."),
    out: Path = typer.Option(None, help="Merged TSV [default: results/certify/sigma-SIGMA.tsv]."),
) -> None:
    """Merge shard TSVs of `dmae certify --shard i/k`, checking every test example appears exactly once."""
    params, _, _ = setup(params_path)
    out = out or paths.certification(sigma)
    n_test = len(load_split(data, "test"))
    merge_shards([shard_path(out, i, shards) for i in range(shards)], out, range(n_test))
    write_settings(out.with_suffix(".settings.json"), resolved(params, SECTIONS, sigma=sigma))
