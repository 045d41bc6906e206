"""`make gpu-check`: run, once, every CUDA path the paper scale relies on and write the figures down.

One script for a lent GPU (sized to stay under 8 minutes on one device; not yet run on one): the `dmae bench`
cases at ViT-B/16 224 (certification in fp32 and bf16, eager and torch.compile with and without CUDA graphs,
pretraining and fine-tuning steps, peak memory, FLOP/s against a matrix product timed in the same run), adaptive
certification with several images in one forward batch against one image at a time, and a one-GPU torchrun of
`dmae certify` on a small synthetic workspace. Writes OUT.md (the format of docs/benchmarks.md) and OUT.json.

    python -m tools.gpu_check --out gpu-check            # on the GPU machine
    python -m tools.gpu_check --device cpu --quick       # the same paths at toy sizes (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmae.data.common import save_tensor_split, write_meta
from dmae.models.checkpoint import save_weights
from dmae.models.classifier import Classifier
from dmae.settings import load_params
from dmae.smoothing import Smooth
from dmae.util.io import atomic_write_text, write_json
from tools.bench import TARGETS, machine, markdown, run_bench
from tools.certify_bench import live_check

REPO = Path(__file__).resolve().parent.parent
SIGMA = 0.25
ALPHA = 0.001


def adaptive_rows(preset: str, device: torch.device, quick: bool, radii) -> list[dict]:
    """Adaptive certification (the mixture; random weights; bf16 on CUDA) on a few images: all images in flight in
    one forward batch (Smooth.certify_all) against one image at a time (Smooth.certify_adaptive); the certificates
    must agree."""
    target = TARGETS[preset]
    images, n0, n_max, batch = (4, 10, 200, 50) if quick else (16, 64, 2000, 256)
    torch.manual_seed(0)
    model = Classifier(target.cfg, target.num_classes).to(device).eval()
    smooth = Smooth(model, target.num_classes, SIGMA, precision="fp32" if device.type == "cpu" else "bf16")
    gen = torch.Generator(device=device).manual_seed(3)
    xs = torch.rand(images, target.cfg.in_chans, target.cfg.img_size, target.cfg.img_size, generator=gen,
                    device=device)
    args = {"method": "mixture", "n0": n0, "alpha": ALPHA, "radii": radii, "batch_size": batch}
    smooth.certify_adaptive(xs[0], n_max=n0, **args)  # warm-up
    run = live_check(smooth, list(xs), n=n_max, **args)
    samples = sum(r[2] for r in run["in_flight"]) + images * n0
    same = run["in_flight"] == run["one_by_one"]
    return [{"configuration": f"mixture, {how}", "images": images, "n_max": n_max, "batch": batch,
             "seconds": round(t, 3), "images_per_s": images / t, "samples_per_s": samples / t,
             "mean_samples": samples / images - n0, "same_certificates": same}
            for how, t in (("all images in flight", run["seconds"]),
                           ("one image at a time", run["seconds_one_at_a_time"]))]


def torchrun_certify(device: torch.device, quick: bool) -> dict:
    """`torchrun --nproc_per_node 1 dmae certify` on a synthetic prepared split and a random tiny classifier in a
    temporary workspace (the DDP path of the certify stage: nccl on CUDA, gloo on CPU)."""
    params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, model = work / "data", work / "model"
        data.mkdir()
        rng = np.random.default_rng(0)
        size, images = params.data.image_size, 4 if quick else 64
        save_tensor_split(data, "test", rng.integers(0, 256, (images, 1, size, size)), rng.integers(0, 10, images))
        meta = write_meta(data, dataset="digits", storage="safetensors", class_names=[str(i) for i in range(10)],
                          channels=1, image_size=size, mean=[0.5], std=[0.25], splits={"test": images})
        torch.manual_seed(0)
        classifier = Classifier(params.model.config(meta), 10)
        save_weights(model, classifier.state_dict(), classifier.config())
        out = work / "certify.tsv"
        env = {**os.environ, "DMAE_DEVICE": device.type, "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                   "-m", "stages.cli", "certify", "--sigma", str(params.sigmas[0]), "--params",
                   str(REPO / "params.yaml"), "--data", str(data), "--model", str(model), "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        rows = len(out.read_text().splitlines()) - 1 if out.exists() else 0
    ok = done.returncode == 0 and rows == images
    return {"ok": ok, "images": images, "rows": rows, "seconds": round(seconds, 1),
            "log_tail": "" if ok else (done.stdout + done.stderr)[-2000:]}


def report_markdown(bench: dict, adaptive: list[dict], launch: dict) -> str:
    lines = [markdown(bench), "", f"## adaptive certification (mixture), preset {bench['preset']} (random weights)", "",
             "| configuration | images | n_max | batch | seconds | images/s | samples/s | mean samples | "
             "same certificates |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['configuration']} | {r['images']} | {r['n_max']} | {r['batch']} | {r['seconds']} | "
              f"{r['images_per_s']:.3g} | {r['samples_per_s']:,.0f} | {r['mean_samples']:.0f} | "
              f"{'yes' if r['same_certificates'] else 'NO'} |" for r in adaptive]
    lines += ["", "## torchrun, 1 process: `dmae certify` on a synthetic split", "",
              f"- {'ok' if launch['ok'] else 'FAILED'}: {launch['rows']}/{launch['images']} rows in "
              f"{launch['seconds']} s (process start-up included)"]
    if launch["log_tail"]:
        lines += ["", "```", launch["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--quick", action="store_true", help="a dry run: the tiny model, toy sizes, no torch.compile")
    parser.add_argument("--out", default="gpu-check", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on the GPU machine, or use --device cpu --quick",
              file=sys.stderr)
        return 2
    params = load_params(REPO / "params.yaml")
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    preset = "tiny" if args.quick else "base"
    bench = run_bench(preset, params, device=device, quick=args.quick, compile=not args.quick, progress=True)
    adaptive = adaptive_rows(preset, device, args.quick, params.report.radii)
    launch = torchrun_certify(device, args.quick)
    result = {"machine": machine(device), "bench": bench, "adaptive": adaptive, "torchrun_certify": launch,
              "seconds": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), report_markdown(bench, adaptive, launch)
                      + f"\nwhole check: {result['seconds']} s\n")
    write_json(out.with_suffix(".json"), result)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} ({result['seconds']} s)")
    failed = not launch["ok"] or not all(r["same_certificates"] for r in adaptive)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
