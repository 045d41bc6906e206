"""`dmae attack`: robust accuracy of every De^3 classifier under l-infinity attacks, over the test sigmas."""

from __future__ import annotations

from pathlib import Path

import typer

from dmae.data import load_split, read_meta
from dmae.defense.robustness import Chain, attack_examples, evaluate_chains
from dmae.report.attack import write_attack_outputs
from dmae.util import distributed as dist
from stages import paths, resolved
from stages.common import PARAMS_OPTION, check_prepared, setup, user_errors, work_state, write_settings

SHOW = 8  # examples in the figure of adversarial examples


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (its test split is attacked)."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: defense/NAME/, pretrain/, denoisers/NAME/."),
    out: Path = typer.Option(paths.ATTACK_RESULTS, help="Where the tables, figures and attack.md go."),
) -> None:
    """Attack each classifier of params defense.classifiers: with a denoiser, as a De^3 defense at every
    attack.test_sigmas (0: the classifier alone); without one, undefended.

    Writes OUT/metrics.json (accuracy per classifier, test sigma and attack: DVC metrics), OUT/tradeoff.tsv
    (the same as a table: a DVC plot), OUT/tradeoff.png|svg, OUT/adversarial.png|svg (adversarial examples,
    noisy and denoised), OUT/attack.md and OUT/attack.json (the report's section, as Markdown and as document
    blocks) and OUT/settings.json. Resumes after an interruption from the last finished (classifier, test sigma)
    row.
    """
    params, runtime, device = setup(params_path, example_parallel=True)
    cfg = params.attack
    check_prepared(data, params)
    settings = resolved.attack(params)
    meta = read_meta(data)
    chains = []
    for name, spec in params.defense.classifiers.items():
        how = params.denoiser_settings(spec.denoiser) if spec.denoiser else None
        chains.append(Chain(name, paths.defense_classifier(name, models),
                            paths.pretrained(spec.denoiser, models) if spec.denoiser else None,
                            how.norm_pix_loss if how else True, how.reconstruct_groups if how else 1))
    inputs = [data, *sorted({p for c in chains for p in (c.classifier, c.denoiser) if p})]
    device = dist.init_from_env(device)
    with work_state("attack", out, settings, inputs) as state:
        x, y, ranks = attack_examples(load_split(data, "test"), cfg.examples, cfg.seed, runtime.workers)
        result = evaluate_chains(chains, params.model.config(meta), meta["num_classes"], x, y, cfg, device=device,
                                 state_dir=state.folder, ranks=ranks, show=SHOW, progress=runtime.progress)
        if dist.is_main():
            write_attack_outputs(*result, params, len(x), out)
            write_settings(out / "settings.json", settings)
        dist.barrier()
        state.finish()
