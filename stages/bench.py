"""`dmae bench` (certification and training throughput against the device's peak) and `dmae bench-methods`
(CERTIFY against adaptive certification on the pipeline's classifiers or a linear oracle); not pipeline stages."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

from dmae.data import load_split, read_meta
from dmae.models.autoencoder import load_autoencoder
from dmae.models.classifier import load_classifier
from dmae.settings import MAIN_DENOISER, Runtime, load_params, load_runtime
from dmae.smoothing import Smooth
from dmae.util.errors import UserError
from dmae.util.io import atomic_write_text, write_json
from dmae.util.progress import say
from dmae.util.state import content_hash
from stages import paths
from stages.common import PARAMS_OPTION, setup, user_errors
from tools.bench import TARGETS, machine, rich_table, run_bench, write_report
from tools.certify_bench import (BASELINE, ORACLE_SPREAD, PLAIN_BASELINE, alike, live_check, load_records, markdown,
                                  oracle_records, record, run_methods, save_records, simulated_records, summary)
from tools.denoiser_error import denoising_mse


def _device(name: str | None, runtime: Runtime) -> torch.device:
    try:
        return (runtime if name is None else Runtime(device=name)).torch_device()
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None


@user_errors
def main(
    preset: str = typer.Option("tiny", help=f"What to measure: {', '.join(TARGETS)} (tiny: the default digits "
                                            "model, 1x16x16, patch 4; base: ViT-B/16 at 3x224x224)."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized: a few samples and steps, one round."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: DMAE_DEVICE, else cuda if available)."),
    compile: bool = typer.Option(False, "--compile", help="Also measure the engine under torch.compile (and CUDA "
                                                          "graphs on CUDA); compiling takes a while."),
    n: int = typer.Option(None, min=1, help="Certification samples N (default: per preset)."),
    n0: int = typer.Option(None, min=1, help="Selection samples N0 (default: per preset)."),
    images: int = typer.Option(None, min=1, help="Images certified per round (default: per preset)."),
    batch_size: int = typer.Option(None, min=1, help="Certification batch size (default: per preset)."),
    train_batch: int = typer.Option(None, min=1, help="Training batch size (default: per preset)."),
    rounds: int = typer.Option(None, min=1, help="Timed rounds; each figure is the best (default: per preset)."),
    out: Path = typer.Option(Path("bench.md"), help="Markdown table; the full report goes beside it as .json."),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """Measure certification (the engine and a locuslab/smoothing-style loop), pretraining and fine-tuning steps,
    and a large matrix product, side by side in one run; print the table and write it to OUT. The training steps
    use the pretrain and finetune settings of the params file at the bench's batch size."""
    if preset not in TARGETS:
        raise UserError(f"--preset {preset!r}: expected one of {', '.join(TARGETS)}")
    params = load_params(params_path)
    runtime = load_runtime()
    torch.set_num_threads(params.cpu_threads)
    overrides = {k: v for k, v in {"n": n, "n0": n0, "images": images, "batch_size": batch_size,
                                   "train_batch": train_batch, "rounds": rounds}.items() if v is not None}
    report = run_bench(preset, params, device=_device(device, runtime), quick=quick, compile=compile,
                       progress=runtime.progress, **overrides)
    Console().print(rich_table(report))
    for path in write_report(report, out):
        say(f"wrote {path}")


@user_errors
def methods(
    n: int = typer.Option(10_000, min=1, help="N of CERTIFY, and n_max of the adaptive methods."),
    simulate_n: int = typer.Option(100_000, min=0, help="Also simulate the methods at this N from the measured "
                                                        "pA of each image (0: no simulation)."),
    images: int = typer.Option(None, min=1, help="Certify only the first IMAGES test images [default: all; "
                                                 "--oracle: 500]."),
    live: int = typer.Option(10, min=0, help="Also certify the first LIVE images live with the mixture, all in "
                                             "flight and one at a time: images/s, and the same results as the "
                                             "replay (0: skip)."),
    oracle: bool = typer.Option(False, "--oracle", help="Instead of the pipeline's classifiers, a binary linear "
                                                        "classifier whose pA is known, at margins spread over the "
                                                        "brackets (adds the Beta(1/2,1/2) mixture every 100)."),
    precision: str = typer.Option(None, help="fp32 or bf16 [default: params certify.precision]."),
    records: Path = typer.Option(None, help="Folder to keep the recorded predictions in (sigma-S.npz), reused by a "
                                            "later run with the same settings, model and data."),
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (its test split is certified)."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: finetune/sigma-S/ for every params sigma."),
    out: Path = typer.Option(Path("bench-methods.md"), help="Markdown table; the results go beside it as .json."),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """CERTIFY against the adaptive methods (mixture, union, and the naive, invalid variant) at the same N, every
    sigma of params: certified accuracy at the report radii, ACR, samples per image and what a fixed-N test that
    knows pA would need, with the certify settings of params (N0, alpha, batch size, seed). The classifier runs
    once per image (a CERTIFY run at N, timed) and every method is replayed on its predictions
    (tools/certify_bench.py)."""
    params, runtime, device = setup(params_path)
    c, radii = params.certify, params.report.radii
    precision = precision or c.precision
    if oracle:
        head = f"linear oracle, {images or 500} margins uniform over (0, {ORACLE_SPREAD:g} x {max(radii):g})"
    else:
        meta = read_meta(data)
        test = load_split(data, "test")
        chosen = range(len(test) if images is None else min(images, len(test)))
        xs, labels = [test[i][0] for i in chosen], [int(test[i][1]) for i in chosen]
        head = f"{len(xs)} test images, {precision}"
    results, checks = [], []
    for sigma in sorted(params.sigmas):
        start = time.perf_counter()
        if oracle:
            kept, seconds = oracle_records(sigma, images or 500, radii, n0=c.n0, n=n, batch_size=c.batch_size,
                                           seed=c.seed)[0], None
        else:
            folder = paths.finetuned(sigma, models)
            classifier = load_classifier(folder, meta["num_classes"], params.model.config(meta)).to(device)
            smooth = Smooth(classifier, meta["num_classes"], sigma, seed=c.seed, precision=precision)
            about = {"sigma": sigma, "n0": c.n0, "n": n, "seed": c.seed, "precision": precision, "images": len(xs),
                     "batch_size": c.batch_size, "device": device.type, "model": content_hash(folder),
                     "data": content_hash(data)}
            found = load_records(records / f"sigma-{sigma}.npz", about) if records else None
            if found:
                kept, seconds = found
            else:
                kept = record(smooth, xs, labels, n0=c.n0, n=n, batch_size=c.batch_size)
                seconds = time.perf_counter() - start
                if records:
                    save_records(records / f"sigma-{sigma}.npz", kept, about, seconds)
        replayed = run_methods(kept, sigma, n0=c.n0, n=n, alpha=c.alpha, radii=radii, oracle=oracle)
        labels_of = [rec.label for rec in kept]
        results += [summary(method, sigma, n, rows, labels_of, radii, c.alpha, seconds if method == "cohen" else None)
                    for method, rows in replayed.items()]
        for name in (BASELINE, PLAIN_BASELINE) if oracle else ():
            count, mixture, baseline = alike(replayed["mixture"], replayed[name], sigma, radii)
            checks.append({"sigma": sigma, "alike": count, "name": name, "mixture": mixture, "baseline": baseline})
        if live and not oracle:
            run = live_check(smooth, xs[:live], method="mixture", n0=c.n0, n=n, alpha=c.alpha, radii=radii,
                             batch_size=c.batch_size)
            checks.append({"sigma": sigma, "images": len(xs[:live]), "images_per_s": len(xs[:live]) / run["seconds"],
                           "images_per_s_one_at_a_time": len(xs[:live]) / run["seconds_one_at_a_time"],
                           "same": run["in_flight"] == run["one_by_one"],
                           "same_as_replay": run["in_flight"] == replayed["mixture"][:live]})
        if simulate_n:
            simulated = run_methods(simulated_records(kept, simulate_n), sigma, n0=c.n0, n=simulate_n,
                                    alpha=c.alpha, radii=radii)
            results += [summary(f"{method} (simulated)", sigma, simulate_n, rows, labels_of, radii, c.alpha)
                        for method, rows in simulated.items() if not method.startswith("naive")]
        say(f"σ = {sigma:g} done")
    table = (f"{head}, N0 = {c.n0}, alpha = {c.alpha:g}, batch {c.batch_size}, {machine(device)['cpu']}\n\n"
             + markdown(results, radii) + "".join(map(_check_line, checks)))
    atomic_write_text(out, table)
    write_json(out.with_suffix(".json"), {"machine": machine(device), "results": [r.__dict__ for r in results],
                                          "checks": checks})
    say(table)


def _check_line(k: dict) -> str:
    if "alike" in k:
        return (f"\nσ = {k['sigma']:g}: on the {k['alike']} images mixture and {k['name']} certify in the same "
                f"bracket, {k['mixture']:,.0f} against {k['baseline']:,.0f} samples per image\n")
    return (f"\nLive, σ = {k['sigma']:g}, {k['images']} images, mixture: {k['images_per_s']:.3g} images/s all in "
            f"flight, {k['images_per_s_one_at_a_time']:.3g} one at a time; same results both ways: "
            f"{'yes' if k['same'] else 'NO'}; same as the replay: {'yes' if k['same_as_replay'] else 'NO'}\n")


@user_errors
def denoisers(
    data: Path = typer.Option(paths.PREPARED, help="Prepared data set (its test split is denoised)."),
    models: Path = typer.Option(paths.MODELS, help="Models folder: pretrain/ and denoisers/NAME/."),
    params_path: Path = PARAMS_OPTION,
) -> None:
    """Denoising error of every pretrained autoencoder (dmae and params defense.denoisers) at every sigma of
    params: mean squared error per pixel (x1000) of the reconstructed test images; the noisy input as baseline."""
    params, _, _ = setup(params_path)
    meta, sigmas = read_meta(data), sorted(params.sigmas)
    images = torch.stack([x for x, _ in load_split(data, "test")])
    lines = ["| denoiser | " + " | ".join(f"σ = {s:g}" for s in sigmas) + " |", "|---|" + "---:|" * len(sigmas),
             "| none (the noisy input, clamped) | " + " | ".join(
                 f"{1000 * denoising_mse(None, images, s):.1f}" for s in sigmas) + " |"]
    for name in [MAIN_DENOISER, *params.defense.denoisers]:
        folder = paths.pretrained(name, models)
        if not (folder / "model.safetensors").is_file():
            say(f"{folder}: not pretrained yet, left out")
            continue
        how = params.denoiser_settings(name)
        model = load_autoencoder(folder, params.model.config(meta))
        lines.append(f"| {name} | " + " | ".join(
            f"{1000 * denoising_mse(model, images, s, how.norm_pix_loss, how.reconstruct_groups):.1f}"
            for s in sigmas) + " |")
    say("\n".join(lines))


@user_errors
def input_pipeline(
    images: int = typer.Option(200, min=1, help="Fabricated JPEGs to read per round."),
    rounds: int = typer.Option(3, min=1, help="Rounds per case (the best counts)."),
    out: Path = typer.Option(Path("bench-input.md"), help="Markdown tables."),
) -> None:
    """The ImageNet input pipeline per CPU core (decode + each stage's transforms) on fabricated JPEGs of
    ImageNet's size and quality, and the cores per GPU each preset's training needs to keep up."""
    from tools.input_bench import fabricate_jpegs, markdown, measure

    with tempfile.TemporaryDirectory(prefix="dmae-input-") as folder:
        jpegs = fabricate_jpegs(Path(folder), images)
        table = f"{machine(torch.device('cpu'))['cpu']}\n\n" + markdown(measure(jpegs, rounds), jpegs)
    atomic_write_text(out, table)
    say(table)


@user_errors
def pipeline(
    params_path: Path = PARAMS_OPTION,
    out: Path = typer.Option(Path("bench-pipeline.md"), help="Markdown table; the measurements go beside it as "
                                                               ".json."),
    root: Path = typer.Option(Path("."), help="The project tree to copy and run (e.g. a checkout of an older "
                                              "commit, to compare): its own code runs its stages."),
) -> None:
    """Run `dvc repro` of the params file in a fresh copy of the project and measure every stage: seconds,
    start-up seconds (process start to its main work), work in FLOPs and the share of this machine's fp32 peak.
    Take it with nothing else running."""
    from tools.pipeline_bench import markdown, run

    report = run(root.resolve(), params_path)
    report["machine"] = machine(torch.device("cpu"))
    table = f"{report['machine']['cpu']}\n\n" + markdown(report)
    atomic_write_text(out, table)
    write_json(out.with_suffix(".json"), report)
    say(table)
