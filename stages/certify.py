"""`dmae certify`: certify the l2 robustness of the smoothed classifier at one sigma (Cohen et al. CERTIFY)."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae import distributed as dist
from dmae.certify import certify_examples, merge_shards
from dmae.classifier import load_classifier
from dmae.datasets import load_split, read_meta
from dmae.errors import UserError
from dmae.model import config_for
from dmae.smoothing import Smooth, check_certify_args
from stages.common import PARAMS_OPTION, resolved, setup, user_errors, write_settings
from stages.finetune import check_sigma

SECTIONS = ["data", "model", "certify"]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/k, e.g. 0/4") from None
    if not 0 <= i < k:
        raise UserError(f"--shard {text!r}: need 0 <= i < k")
    return i, k


def shard_path(out: Path, i: int, k: int) -> Path:
    return out.with_name(f"{out.stem}.shard-{i}-of-{k}{out.suffix}")


@user_errors
def main(
    sigma: float = typer.Option(..., help="Noise level (one of params `sigmas`)."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set (its test split is certified)."),
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
    i, k = parse_shard(shard)
    device = dist.init_from_env(device)
    if dist.world_size() > 1:  # torchrun: process r certifies shard r, then rank 0 merges
        if k > 1:
            raise UserError("--shard and torchrun both split the work: use one of them")
        i, k = dist.rank(), dist.world_size()
    model = model or Path(f"models/finetune/sigma-{sigma}")
    out = out or Path(f"results/certify/sigma-{sigma}.tsv")
    meta = read_meta(data)
    classifier = load_classifier(model, expect_classes=meta["num_classes"],
                                 expect_cfg=config_for(params.model, meta)).to(device)
    test = load_split(data, "test")
    smooth = Smooth(classifier, meta["num_classes"], sigma, seed=c.seed, precision=c.precision)
    target = out if k == 1 else shard_path(out, i, k)
    certify_examples(smooth, test, range(len(test)), n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size,
                     out_path=target, shard=(i, k), progress=runtime.progress and dist.is_main())
    if dist.world_size() > 1:
        dist.barrier()
        if dist.is_main():
            shards = [shard_path(out, r, k) for r in range(k)]
            merge_shards(shards, out, range(len(test)))
            for path in shards:
                path.unlink()
    if k == 1 or dist.world_size() > 1:
        if dist.is_main():
            write_settings(out.with_suffix(".settings.json"), resolved(params, SECTIONS, sigma=sigma))


@user_errors
def merge(
    sigma: float = typer.Option(..., help="Noise level whose shards to merge."),
    shards: int = typer.Option(..., min=1, help="Number of shards k the work was split into."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set."),
    out: Path = typer.Option(None, help="Merged TSV [default: results/certify/sigma-SIGMA.tsv]."),
) -> None:
    """Merge shard TSVs of `dmae certify --shard i/k`, checking every test example appears exactly once."""
    params, _, _ = setup(params_path)
    out = out or Path(f"results/certify/sigma-{sigma}.tsv")
    n_test = len(load_split(data, "test"))
    merge_shards([shard_path(out, i, shards) for i in range(shards)], out, range(n_test))
    write_settings(out.with_suffix(".settings.json"), resolved(params, SECTIONS, sigma=sigma))
