"""`dmae attack`: robust accuracy of every De^3 classifier under l-infinity attacks, over the test sigmas."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import typer

from dmae.attack_report import Row, metrics, section, sigma_label, tradeoff_figure, tradeoff_table
from dmae.checkpoint import load_state, save_state
from dmae.classifier import load_classifier
from dmae.datasets import load_split, read_meta
from dmae.defense import Defense, load_denoiser
from dmae.document import to_json, to_markdown
from dmae.figures import image_grid
from dmae.io import atomic_write_text, write_json, write_tsv
from dmae.model import config_for
from dmae.progress import console, progress_bar
from dmae.robustness import evaluate
from dmae.seeding import derive_seed
from stages.common import PARAMS_OPTION, resolved, setup, state_path, user_errors, write_settings
from stages.finetune_defense import pretrained_dir

SECTIONS = ["data", "model", "defense", "attack"]
SHOW = 8  # examples in the figure of adversarial examples


def attack_examples(dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of n examples of `dataset` (all of them if it is smaller), in index order."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, "examples")))
    chosen = sorted(order[:n].tolist())
    return torch.stack([dataset[i][0] for i in chosen]), torch.tensor([int(dataset[i][1]) for i in chosen])


@user_errors
def main(
    params_path: Path = PARAMS_OPTION,
    data: Path = typer.Option(Path("data/prepared"), help="Prepared data set (its test split is attacked)."),
    models: Path = typer.Option(Path("models"), help="Models folder: defense/NAME/, pretrain/, denoisers/NAME/."),
    out: Path = typer.Option(Path("results/attack"), help="Where the tables, figures and attack.md go."),
) -> None:
    """Attack each classifier of params defense.classifiers: with a denoiser, as a De^3 defense at every
    attack.test_sigmas (0: the classifier alone); without one, undefended.

    Writes OUT/metrics.json (accuracy per classifier, test sigma and attack: DVC metrics), OUT/tradeoff.tsv
    (the same as a table: a DVC plot), OUT/tradeoff.png|svg, OUT/adversarial.png|svg (adversarial examples,
    noisy and denoised), OUT/attack.md and OUT/attack.json (the report's section, as Markdown and as document
    blocks) and OUT/settings.json. Resumes after an interruption from the last finished (classifier, test sigma)
    row.
    """
    params, runtime, device = setup(params_path)
    cfg = params.attack
    settings = resolved(params, SECTIONS)
    resume = state_path("attack", settings)
    done = load_state(resume) or {}  # finished rows: "name|sigma" -> {"accuracy", "shown"}
    meta = read_meta(data)
    model_cfg = config_for(params.model, meta)
    x, y = attack_examples(load_split(data, "test"), cfg.examples, cfg.seed)
    x, y = x.to(device), y.to(device)
    classifiers = params.defense.classifiers
    rows: list[Row] = []
    shown = {"clean": x[:SHOW]}
    with progress_bar(runtime.progress, unit="row") as bar:
        task = bar.add_task("attack", status="", total=sum(
            len(cfg.test_sigmas) if spec.denoiser else 1 for spec in classifiers.values()))
        for name, spec in classifiers.items():
            classifier = load_classifier(models / "defense" / name, meta["num_classes"], model_cfg).to(device)
            denoiser, norm_pix_loss = None, True
            if spec.denoiser:
                denoiser = load_denoiser(pretrained_dir(models, spec.denoiser), model_cfg).to(device)
                norm_pix_loss = params.denoiser_settings(spec.denoiser).norm_pix_loss
            for sigma in cfg.test_sigmas if denoiser else [0.0]:
                where = f"{name} σ={sigma_label(sigma)}"

                def log(column: str, accuracy: float, seconds: float) -> None:
                    console.log(f"{where} {column}: accuracy {accuracy:.3f} ({seconds:.1f} s)")
                    bar.update(task, status=f"{where} {column}")

                defense = Defense(denoiser, classifier, sigma, norm_pix_loss)
                keep = SHOW if name == cfg.figure and sigma > 0 else 0
                row_key = f"{name}|{sigma!r}"
                if row_key not in done:
                    result = evaluate(defense, x, y, cfg, key=(name, sigma), keep=keep, on_column=log)
                    done[row_key] = {"accuracy": result.accuracy, "shown": result.shown}
                    save_state(resume, done)
                rows.append(Row(name, sigma, denoiser is not None, done[row_key]["accuracy"]))
                if keep:
                    adversarial = done[row_key]["shown"].to(device)
                    torch.manual_seed(derive_seed(cfg.seed, "figure", sigma))
                    with torch.no_grad():
                        noisy, denoised = defense.purify(adversarial)
                    label = sigma_label(sigma)
                    shown |= {f"adversarial\nσ={label}": adversarial, f"noisy\nσ={label}": noisy,
                              f"denoised\nσ={label}": denoised}
                bar.advance(task)

    write_json(out / "metrics.json", metrics(rows))
    table, columns = tradeoff_table(rows, cfg)
    write_tsv(out / "tradeoff.tsv", table, columns)
    tradeoff_figure(rows, cfg, out / "tradeoff")
    image_grid(shown, out / "adversarial",
               title=f"{cfg.figure}: white-box PGD-EOT examples (ε = {sigma_label(cfg.eps)}), noised, denoised")
    blocks = section(rows, cfg, params.data.dataset, len(x), ["tradeoff.png", "adversarial.png"])
    atomic_write_text(out / "attack.md", to_markdown(blocks))
    write_json(out / "attack.json", to_json(blocks))  # the same section, for `dmae report`
    write_settings(out / "settings.json", settings)
    shutil.rmtree(resume.parent, ignore_errors=True)
