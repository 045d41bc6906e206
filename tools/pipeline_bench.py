"""`dmae bench-pipeline`: the pipeline's `dvc repro` stage by stage, in a fresh copy of the project.

For every stage: wall seconds (from DVC starting it to DVC starting the next), start-up seconds (from its process
starting to its main work starting: imports, reading settings, data and models; recorded by the stage itself
through DMAE_TIMINGS), the work it does (FLOPs, tools/projection.py at the data set's real sizes; the attack
stage's count is an upper bound, as its attacks stop early on broken examples; the adaptive certification
methods' counts are the samples they drew, from their tables) and the share of this machine's
peak that makes: FLOPs / seconds against a large fp32 matrix product timed on as many threads before and after
the run (the better of the two).
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dmae.settings import Params, parse_params
from dmae.util.errors import UserError
from tools import rehearse
from tools.projection import stage_flops


def matmul_peak(threads: int, size: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` fp32 matrix products of side `size` on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(previous)
    return 2 * size**3 / best


def drawn_flops(flops: dict[str, float], params: Params, workspace: Path) -> dict[str, float]:
    """The adaptive methods stop early: their certification stages' FLOPs (counted at the most samples they may
    draw, N0 + n_max per image) scaled by the samples their tables (the stage's .tsv out in dvc.lock) say each
    image drew (N0 + `samples`)."""
    c = params.certify
    if c.method == "cohen":
        return flops
    lock = yaml.safe_load((workspace / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    out = dict(flops)
    for stage in flops:
        if stage.startswith(("certify@", "certify_chain@")):
            table = next(o["path"] for o in lock[stage]["outs"] if o["path"].endswith(".tsv"))
            with open(workspace / table, encoding="utf-8", newline="") as f:
                drawn = [c.n0 + int(row["samples"]) for row in csv.DictReader(f, delimiter="\t")]
            out[stage] = flops[stage] * sum(drawn) / (len(drawn) * (c.n0 + c.n_max))
    return out


def run(root: Path, params_path: Path, workspace: Path | None = None) -> dict:
    """`dvc repro` of `params_path` in a new copy of the project at `root`; returns the per-stage measurements.
    Params this code cannot read (an older commit's) are run all the same, without FLOP counts."""
    raw = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    try:
        params = parse_params(raw)
        flops = stage_flops(params)
    except UserError:
        params, flops = None, {}
    threads = int(raw["cpu_threads"])
    peaks = [matmul_peak(threads)]
    with tempfile.TemporaryDirectory(prefix="dmae-bench-pipeline-") as tmp:
        ws = workspace or Path(tmp)
        ws.mkdir(parents=True, exist_ok=True)
        rehearse.make_workspace(root, ws)
        (ws / "params.yaml").write_text(params_path.read_text(encoding="utf-8"), encoding="utf-8")
        timings = ws / "timings.jsonl"
        env = {**rehearse.environment(ws, None, threads), "DMAE_TIMINGS": str(timings)}
        t0 = time.monotonic()
        result = rehearse.run_dvc_repro(ws, env, ws / "repro.log")
        total = time.monotonic() - t0
        if result.returncode:
            raise RuntimeError("dvc repro failed:\n" + "\n".join(result.tail))
        records = [json.loads(line) for line in timings.read_text(encoding="utf-8").splitlines()] \
            if timings.is_file() else []  # code from before DMAE_TIMINGS records nothing
        if params is not None:
            flops = drawn_flops(flops, params, ws)
    peaks.append(matmul_peak(threads))
    startup = {}
    for r in records:
        if r["stage"] and r["process_start"] and r["stage"] not in startup:
            startup[r["stage"]] = r["work_start"] - r["process_start"]
    rows = [{"stage": name, "seconds": seconds, "startup": startup.get(name), "flops": flops.get(name)}
            for name, seconds in result.seconds.items()]
    return {"total_seconds": total, "peak_flops": max(peaks), "threads": threads, "rows": rows}


def markdown(report: dict) -> str:
    peak = report["peak_flops"]
    lines = [f"`dvc repro` {report['total_seconds']:.0f} s; fp32 matrix-product peak {peak / 1e9:.0f} GFLOP/s on "
             f"{report['threads']} threads.", "",
             "| stage | seconds | start-up s | work (TFLOP) | GFLOP/s | % of peak |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        flops = r["flops"]
        rate = flops / r["seconds"] if flops else None
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | "
                     + (f"{r['startup']:.1f}" if r["startup"] is not None else "—") + " | "
                     + (f"{flops / 1e12:.2f}" if flops else "—") + " | "
                     + (f"{rate / 1e9:.0f} | {100 * rate / peak:.0f}" if rate else "— | —") + " |")
    return "\n".join(lines) + "\n"
