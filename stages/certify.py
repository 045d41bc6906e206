"""`dmae certify`: certify the l2 robustness of the smoothed classifier at one sigma (CERTIFY or adaptive)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from torch.utils.data import Dataset, Subset

from dmae.data import load_split, read_meta
from dmae.models.classifier import load_classifier
from dmae.smoothing import Smooth, check_certify_args
from dmae.smoothing.certify import certify_split, merge_shards, shard_path
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from dmae.util.io import write_json
from dmae.util.state import changed_keys
from stages import paths, resolved
from stages.common import PARAMS_OPTION, check_prepared, check_sigma, setup, user_errors, work_state, write_settings


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/k, e.g. 0/4") from None
    if not 0 <= i < k:
        raise UserError(f"--shard {text!r}: need 0 <= i < k")
    return i, k


def fingerprint_path(shard: Path) -> Path:
    """What a shard was certified from (settings, model and data hashes, code), for `dmae certify-merge`."""
    return shard.with_suffix(".fingerprint.json")


def certified_examples(data: Path, every: int) -> Dataset:
    """Every `every`-th example of the test split (params certify.test_every); the TSVs' idx counts these."""
    test = load_split(data, "test")
    return Subset(test, range(0, len(test), every))


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
    """Certify every certify.test_every-th example of the test split with params `certify` (method, N0, N or
    n_max, alpha); resumes after an interruption.

    Writes OUT with one row per example: idx label predict radius correct samples votes (predict -1 = abstain;
    samples: estimation samples used; votes: of them, those for the selected class), OUT's .settings.json, and
    seconds per example to results/timings/ (not a DVC output: times vary from run to run).
    """
    params, runtime, device = setup(params_path, example_parallel=True)
    check_sigma(sigma, params.sigmas)
    c = params.certify
    check_certify_args(n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch_size)
    i, k = parse_shard(shard)
    device = dist.init_from_env(device)
    model, out = model or paths.finetuned(sigma), out or paths.certification(sigma)
    check_prepared(data, params)
    meta = read_meta(data)
    classifier = load_classifier(model, expect_classes=meta["num_classes"],
                                 expect_cfg=params.model.config(meta)).to(device)
    smooth = Smooth(classifier, meta["num_classes"], sigma, seed=c.seed, precision=c.precision)
    target = out if k == 1 else shard_path(out, i, k)
    settings = resolved.certify(params, sigma)
    with work_state("certify", target, settings, [data, model]) as state:
        whole = certify_split(smooth, certified_examples(data, c.test_every), out, work_dir=state.folder, shard=(i, k),
                              timing=paths.timing(target), progress=runtime.progress, n0=c.n0,
                              n=c.n if c.method == "cohen" else c.n_max, alpha=c.alpha, batch_size=c.batch_size,
                              method=c.method, radii=params.report.radii)
        if whole:
            write_settings(out.with_suffix(".settings.json"), settings)
        elif k > 1:
            write_json(fingerprint_path(target), state.fingerprint)
        state.finish()


@user_errors
def merge(
    sigma: float = typer.Option(..., help="Noise level whose shards to merge."),
    shards: int = typer.Option(..., min=1, help="Number of shards k the work was split into."),
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set."),
    model: Path = typer.Option(None, help="Fine-tuned classifier the shards certify [default: "
                                          "models/finetune/sigma-SIGMA]."),
    out: Path = typer.Option(None, help="Merged TSV [default: results/certify/sigma-SIGMA.tsv]."),
) -> None:
    """Merge shard TSVs of `dmae certify --shard i/k`, checking that every shard was certified from the same
    settings, classifier, data and code as the params ask for now, and that every test example appears exactly
    once."""
    params, _, _ = setup(params_path)
    check_sigma(sigma, params.sigmas)
    out, model = out or paths.certification(sigma), model or paths.finetuned(sigma)
    settings = resolved.certify(params, sigma)
    expected = work_state("certify", out, settings, [data, model]).fingerprint
    parts = [shard_path(out, i, shards) for i in range(shards)]
    for part in parts:
        found = fingerprint_path(part)
        if not found.is_file():
            raise UserError(f"{found}: not found; certify shard {part} with `dmae certify --shard i/{shards}`")
        recorded = json.loads(found.read_text(encoding="utf-8"))
        if recorded != expected:
            changed = changed_keys(recorded, expected)
            raise UserError(f"{part} was certified from other inputs than the params, model and data give now "
                            f"({', '.join(changed[:6])} differ); certify it again")
    merge_shards(parts, out, range(len(certified_examples(data, params.certify.test_every))))
    write_settings(out.with_suffix(".settings.json"), settings)

