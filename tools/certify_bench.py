"""Adaptive certification against CERTIFY at the same N: the table, ACR and samples, with the classifier run once
per image.

Noise is a pure function of (seed, sigma, example index, phase, sample position) (dmae.smoothing.engine), so the
estimation samples any method draws for an image are a prefix of one sequence of predictions. `record` runs the
classifier once per image for N0 selection and N estimation samples (the noise of CERTIFY at N, and of every
adaptive method with n_max = N) and keeps the class of every estimation sample; `replay` runs any method's job on
that record exactly as the engine would (tests/test_bench.py checks replays against live runs, and `live_check`
does on the benchmark's own images while it times the engine); `save_records` keeps them for another replay.
The methods:
- `cohen`: CERTIFY with N estimation samples;
- `mixture`: the beta-binomial mixture confidence sequence, at most N (dmae.smoothing.bounds);
- `union`: Clopper-Pearson with alpha split over looks 32, 64, ..., at most N;
- `naive (not valid)`: `union` re-applying Clopper-Pearson at level alpha after every look: it stops earlier and
  is NOT valid (tests/test_reliability_guarantee.py counts its false certificates on the linear oracle);
- `Beta(1/2,1/2) every 100` (`--oracle` only): Robbins' two-sided mixture with Jeffreys' prior (the published
  form), looking every 100 samples.
`simulate` replays CERTIFY and the adaptive methods at a larger N on records drawn from each image's measured pA.
`oracle_records` makes records of a binary linear classifier whose pA is known in closed form.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.special import betaln
from torch import nn

from dmae.report.certified import Run
from dmae.smoothing import Smooth
from dmae.smoothing.bounds import BISECTIONS, ROUNDING, brackets, fewest_votes, predictive_futility
from dmae.smoothing.engine import (ESTIMATION, SELECTION, Job, cohen_job, mixture_job, run_jobs, sequential_job,
                                   union_job)
from dmae.util.errors import UserError

ORACLE_LOOK = 100  # looks of the `Beta(1/2,1/2) every 100` baseline
ORACLE_SPREAD = 1.25  # oracle margins are uniform over (0, ORACLE_SPREAD x the largest radius)
BASELINE = f"Beta(1/2,1/2) every {ORACLE_LOOK}"  # the oracle's published baseline
PLAIN_BASELINE = f"{BASELINE}, plain stops"  # the same without the futility rule, as issue 23 measured it


@dataclass(frozen=True)
class Record:
    """One image: its label, the selection counts, and the class of each estimation sample in order."""
    label: int
    selection: np.ndarray  # counts per class of the N0 selection samples
    estimation: np.ndarray  # class of each estimation sample


@dataclass(frozen=True)
class Result:
    method: str
    sigma: float
    n: int  # N of CERTIFY, n_max of the adaptive methods
    certified: list[float]  # certified accuracy at each radius
    acr: float
    mean_samples: float
    median_samples: float
    fixed_n: float  # mean over images of the fewest samples a fixed-N test knowing pA needs for the same bracket
    seconds: float | None  # wall time of the run (None: replayed or simulated)


def record(smooth: Smooth, images: Sequence[torch.Tensor], labels: Sequence[int], *, n0: int, n: int,
           batch_size: int) -> list[Record]:
    """Run the classifier once per image (example index = position) for n0 selection and n estimation samples,
    through the engine, keeping the predicted class of every sample."""
    records = []
    for index, (x, label) in enumerate(zip(images, labels)):
        classes, classify = [], smooth.classify(batch_size)

        def keep(batch: torch.Tensor) -> torch.Tensor:
            predicted = classify(batch)
            classes.append(predicted.cpu())
            return predicted

        (_, counts), = run_jobs(keep, smooth.num_classes, smooth.sigma, smooth.seed, [(index, x, _phases(n0, n))],
                                batch_size, smooth.device)
        predicted = torch.cat(classes).numpy().astype(np.int16)  # one image in flight: the batches are in order
        records.append(Record(int(label), counts, predicted[n0:]))
    return records


def save_records(path: Path, records: list[Record], about: dict, seconds: float) -> None:
    """Keep records (and the seconds recording them took) in an .npz file, with `about`: what they depend on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, about=json.dumps(about, sort_keys=True), seconds=seconds,
                            labels=np.array([rec.label for rec in records]),
                            selection=np.stack([rec.selection for rec in records]),
                            estimation=np.stack([rec.estimation for rec in records]))


def load_records(path: Path, about: dict) -> tuple[list[Record], float] | None:
    """The records kept in `path` and their seconds; None when there is no file. A UserError when they were
    recorded with other settings, model or data than `about` says."""
    if not path.is_file():
        return None
    with np.load(path) as kept:
        if json.loads(str(kept["about"])) != about:
            raise UserError(f"{path}: recorded with other settings, model or data ({kept['about']}, now "
                            f"{json.dumps(about, sort_keys=True)}); delete it to record again")
        records = [Record(int(label), selection, estimation) for label, selection, estimation in
                   zip(kept["labels"], kept["selection"], kept["estimation"])]
        return records, float(kept["seconds"])


def _phases(n0: int, n: int) -> Job:
    selection = yield SELECTION, n0, n0
    yield ESTIMATION, n, n
    return selection


def replay(job: Job, rec: Record) -> tuple:
    """The result of `job` on the recorded samples of one image, sent exactly as the engine sends them."""
    counts, done, classes = None, 0, len(rec.selection)
    try:
        while True:
            phase, need, _ = job.send(counts)
            if phase == SELECTION:
                if need != rec.selection.sum():
                    raise ValueError(f"the job asks for {need} selection samples, the record has {rec.selection.sum()}")
                counts = rec.selection
            else:
                if done + need > len(rec.estimation):
                    raise ValueError(f"the job asks for {done + need} estimation samples, the record has "
                                     f"{len(rec.estimation)}")
                counts = np.bincount(rec.estimation[done:done + need], minlength=classes)
                done += need
    except StopIteration as stop:
        return stop.value


class EveryHundred:
    """The published form of the mixture, a baseline: Robbins' two-sided mixture with Jeffreys' prior Beta(1/2,
    1/2), M_n(p) = B(1/2 + nA, 1/2 + n - nA) / B(1/2, 1/2) / (p^nA (1 - p)^(n - nA)), all of alpha on it, looked at
    every ORACLE_LOOK samples, with the mixture's stopping rule (futility under the same prior). M_n falls as p
    rises to nA / n, so it certifies t when it rejects t."""

    def __init__(self, n_max: int, alpha: float):
        self.n_max, self.level = n_max, math.log(1 / alpha)
        self._needs: dict[float, int] = {}

    def rejects(self, n_a: int, n: int, p: float) -> bool:
        terms = (float(betaln(0.5 + n_a, 0.5 + n - n_a)), -float(betaln(0.5, 0.5)), -n_a * math.log(p),
                 -(n - n_a) * math.log1p(-p))
        return math.fsum(terms) - ROUNDING * (1 + sum(map(abs, terms))) >= self.level

    def certifies(self, n_a: int, n: int, t: float) -> bool:
        return n_a > t * n and self.rejects(n_a, n, t)

    def futile(self, n_a: int, n: int, t: float) -> bool:
        if t not in self._needs:
            self._needs[t] = fewest_votes(lambda c: self.certifies(c, self.n_max, t), self.n_max)
        return predictive_futility(self._needs[t], n_a, n, self.n_max, 0.5, 0.5)

    def next_look(self, n_a: int, n: int, t: float) -> int:
        return min(n + ORACLE_LOOK, self.n_max)

    def lower(self, n_a: int, n: int) -> float:
        low, high = 0.0, n_a / n
        for _ in range(BISECTIONS if n_a else 0):
            mid = (low + high) / 2
            low, high = (mid, high) if self.rejects(n_a, n, mid) else (low, mid)
        return low


class EveryHundredPlainStops(EveryHundred):
    """The baseline with the stopping rules the adaptive methods had before the futility rule: stop when M_n
    rejects t from above (pA < t shown) or t is out of reach even if every further sample agrees."""

    def futile(self, n_a: int, n: int, t: float) -> bool:
        return (n_a < t * n and self.rejects(n_a, n, t)) or not self.certifies(n_a + self.n_max - n, self.n_max, t)


def method_jobs(n0: int, n: int, alpha: float, sigma: float, radii,
                oracle: bool = False) -> dict[str, Callable[[], Job]]:
    jobs = {"cohen": lambda: cohen_job(n0, n, alpha, sigma),
            "mixture": lambda: mixture_job(n0, n, alpha, sigma, radii),
            "union": lambda: union_job(n0, n, alpha, sigma, radii),
            "naive (not valid)": lambda: union_job(n0, n, alpha, sigma, radii, naive=True)}
    if oracle:
        jobs[BASELINE] = lambda: sequential_job(n0, sigma, radii, lambda n_a0, n0: EveryHundred(n, alpha))
        jobs[PLAIN_BASELINE] = lambda: sequential_job(n0, sigma, radii,
                                                      lambda n_a0, n0: EveryHundredPlainStops(n, alpha))
    return jobs


def summary(method: str, sigma: float, n: int, results: list[tuple], labels: Sequence[int], radii: Sequence[float],
            alpha: float, seconds: float | None = None) -> Result:
    """The table row of one method from its per-image results (class or -1, radius, samples, votes)."""
    predict, radius, samples, votes = (np.array(column) for column in zip(*results))
    run = Run(sigma, radius.astype(np.float64), predict == np.asarray(labels), predict == -1, samples, votes)
    return Result(method, sigma, n, run.certified_accuracy(radii), run.acr, run.mean_samples, run.median_samples,
                  float(np.mean(run.fixed_n_samples(radii, alpha))), seconds)


def alike(first: list[tuple], second: list[tuple], sigma: float, radii: Sequence[float]) -> tuple[int, float, float]:
    """How many images two methods certify in the same bracket (the highest radius of `radii` not above the
    radius, or none), and the mean samples each took on them: the cost of the same table."""
    tabulated, _ = brackets(radii, sigma)

    def bracket(result: tuple) -> int:
        return -1 if result[0] == -1 else bisect.bisect_right(tabulated, result[1])

    same = [i for i, (a, b) in enumerate(zip(first, second)) if bracket(a) == bracket(b)]
    return len(same), float(np.mean([first[i][2] for i in same])), float(np.mean([second[i][2] for i in same]))


def run_methods(records: list[Record], sigma: float, *, n0: int, n: int, alpha: float, radii: Sequence[float],
                oracle: bool = False) -> dict[str, list[tuple]]:
    """Every method's per-image results, replayed on the records."""
    return {method: [replay(job(), rec) for rec in records]
            for method, job in method_jobs(n0, n, alpha, sigma, radii, oracle).items()}


def live_check(smooth: Smooth, images: Sequence[torch.Tensor], *, method: str, n0: int, n: int, alpha: float,
               radii: Sequence[float], batch_size: int) -> dict:
    """Certify `images` (example index = position) live with an adaptive method twice: all in flight, several
    images per forward batch (Smooth.certify_all), and one image at a time (Smooth.certify_adaptive); time both.
    Returns the results of both ways (lists in image order) and their seconds."""
    args = {"n0": n0, "alpha": alpha, "batch_size": batch_size, "radii": radii}
    sync = torch.cuda.synchronize if smooth.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    in_flight = {i: tuple(r) for i, *r in smooth.certify_all(enumerate(images), n=n, method=method, **args)}
    sync()
    middle = time.perf_counter()
    one_by_one = [smooth.certify_adaptive(x, n_max=n, method=method, index=i, **args) for i, x in enumerate(images)]
    sync()
    return {"in_flight": [in_flight[i] for i in range(len(images))], "one_by_one": one_by_one,
            "seconds": middle - start, "seconds_one_at_a_time": time.perf_counter() - middle}


def simulated_records(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """Records of n estimation samples drawn as cA with probability (nA + 1/2) / (N + 1), nA of the N recorded
    ones voting cA, and as another class otherwise; the selection counts as recorded."""
    rng, out = np.random.default_rng(seed), []
    for rec in records:
        c_a = int(np.argmax(rec.selection))
        p = (np.sum(rec.estimation == c_a) + 0.5) / (len(rec.estimation) + 1)
        other = (c_a + 1) % len(rec.selection)
        out.append(Record(rec.label, rec.selection, np.where(rng.random(n) < p, c_a, other).astype(np.int16)))
    return out


class LinearBinary(nn.Module):
    """f(x) = [w.x + b > 0] as the logits (0, w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.linear = nn.Linear(w.numel(), 1)
        with torch.no_grad():
            self.linear.weight.copy_(w.reshape(1, -1))
            self.linear.bias.fill_(b)

    def forward(self, x):
        z = self.linear(x.flatten(1))
        return torch.cat((torch.zeros_like(z), z), dim=1)


def oracle_records(sigma: float, images: int, radii: Sequence[float], *, n0: int, n: int, batch_size: int,
                   seed: int = 0) -> tuple[list[Record], np.ndarray]:
    """Records of a binary linear classifier with unit normal w through x0 (pA = Phi(m / sigma) at margin m, true
    radius m), at `images` margins uniform over (0, ORACLE_SPREAD x the largest radius); returns them and the
    margins. Label 1 is the true class."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 2, 2, generator=gen)
    w /= w.norm()
    x0 = torch.full_like(w, 0.5)
    margins = np.random.default_rng(seed).uniform(0, ORACLE_SPREAD * max(radii), images)
    smooth = Smooth(LinearBinary(w, -float((w * x0).sum())), 2, sigma, seed=seed)
    return record(smooth, [x0 + float(m) * w for m in margins], [1] * images, n0=n0, n=n,
                  batch_size=batch_size), margins


def markdown(results: list[Result], radii: Sequence[float]) -> str:
    head = ["σ", "method", "N", *(f"r = {r:g}" for r in radii), "ACR", "samples / image (mean)", "(median)",
            "N / mean", "fixed-N need (mean)", "mean / need", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            f"{r.sigma:g}", r.method, f"{r.n:,}", *(f"{100 * a:.1f}" for a in r.certified), f"{r.acr:.3f}",
            f"{r.mean_samples:,.0f}", f"{r.median_samples:,.0f}", f"{r.n / r.mean_samples:.2f}x",
            f"{r.fixed_n:,.0f}", f"{r.mean_samples / r.fixed_n:.2f}x",
            "—" if r.seconds is None else f"{r.seconds:.0f}"]) + " |")
    return "\n".join(lines) + "\n"
