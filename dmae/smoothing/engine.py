"""The sampling engine of randomized smoothing: many images in flight, full batches, per-image counts.

Every certification or prediction of one image is a *job*: a generator that asks for noisy samples of one phase
(selection, estimation, prediction), receives the class counts of exactly those samples, and decides (CERTIFY's
two phases; the looks of adaptive certification; PREDICT). `run_jobs` serves the requests of several jobs with one
forward pass: a batch carries the samples of as many images as it takes to fill it, so images that stop early
(adaptive certification) never leave batches mostly empty.

Noise: sample j of (example index, phase) is a pure function of the seed, sigma, index, phase and j (see
`NoiseStream`), so the counts at any point of a phase do not depend on the batch size, on which other images
share a batch, on shards or on processes.
"""

from __future__ import annotations

import functools
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Iterator

import numpy as np
import torch

from dmae.smoothing.bounds import (ConfidenceSequence, MixtureSequence, UnionOfLooks, brackets, lower_confidence_bound,
                                   radius_from_lower)

NOISE_BLOCK = 256  # samples per generator; changing it changes every result
SELECTION, ESTIMATION, PREDICTION = "selection", "estimation", "prediction"
ABSTAIN = -1

Request = tuple[str, int, int]  # (phase, samples wanted now, planned total of the phase)
Job = Generator[Request, np.ndarray, object]


def block_seed(seed: int, sigma: float, index: int, phase: str, block: int) -> int:
    """The 64-bit generator seed of one noise block of one example."""
    key = f"dmae.smoothing|{int(seed)}|{float(sigma)!r}|{int(index)}|{phase}|{int(block)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class NoiseStream:
    """Standard normal samples of one example and phase, in order. Block k (NOISE_BLOCK samples, the last one
    shorter when the phase's planned `total` ends inside it) is drawn from a generator seeded with seed_of(k),
    so a prefix of the stream is the same however it is taken."""

    def __init__(self, shape: torch.Size, total: int, seed_of: Callable[[int], int], device: torch.device):
        self.shape, self.total, self.seed_of, self.device = shape, total, seed_of, device
        self.block, self.buffer = 0, torch.empty((0, *shape), device=device)

    def take(self, m: int) -> torch.Tensor:
        parts = []
        while m:
            if not len(self.buffer):
                size = min(NOISE_BLOCK, self.total - self.block * NOISE_BLOCK)
                gen = torch.Generator(device=self.device).manual_seed(self.seed_of(self.block))
                self.buffer = torch.randn((size, *self.shape), generator=gen, device=self.device)
                self.block += 1
            part, self.buffer = self.buffer[:m], self.buffer[m:]
            parts.append(part)
            m -= len(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# -- jobs ---------------------------------------------------------------------------------------------------------

def certify_from_counts(selection: np.ndarray, estimation: np.ndarray, alpha: float,
                        sigma: float) -> tuple[int, float]:
    """CERTIFY's decision: cA from the selection counts, its lower bound from the independent estimation counts."""
    c_a = int(np.argmax(selection))
    radius = radius_from_lower(lower_confidence_bound(int(estimation[c_a]), int(np.sum(estimation)), alpha), sigma)
    return (ABSTAIN, 0.0) if radius is None else (c_a, radius)


def cohen_job(n0: int, n: int, alpha: float, sigma: float) -> Job:
    """CERTIFY (Cohen et al. 2019): cA from n0 selection samples, its lower bound from n fresh ones.
    Returns (class or -1, radius, estimation samples, of them voting cA)."""
    selection = yield SELECTION, n0, n0
    estimation = yield ESTIMATION, n, n
    return (*certify_from_counts(selection, estimation, alpha, sigma), n, int(estimation[np.argmax(selection)]))


def sequential_job(n0: int, sigma: float, radii, sequence_of: Callable[[int, int], ConfidenceSequence]) -> Job:
    """Adaptive certification: cA as in CERTIFY; then estimation samples up to each look of the sequence
    (`sequence_of(selection votes for cA, n0)`), stopping once more samples will not raise the certificate to
    another radius of `radii`: the highest is certified, or the next one is futile (at n_max it always is).
    The radius is the larger of the last look's lower bound and the highest tabulated radius certified at any look
    (dmae.smoothing.bounds). Returns (class or -1, radius, estimation samples, of them voting cA)."""
    selection = yield SELECTION, n0, n0
    c_a = int(np.argmax(selection))
    sequence = sequence_of(int(selection[c_a]), n0)
    radii, cuts = brackets(radii, sigma)
    counts, n, n_a, certified = np.zeros_like(selection), 0, 0, -1  # certified: index of the highest bracket shown
    while True:
        look = sequence.next_look(n_a, n, cuts[certified + 1])
        counts = counts + (yield ESTIMATION, look - n, sequence.n_max)
        n, n_a = look, int(counts[c_a])
        certified = max((k for k in range(certified + 1, len(cuts)) if sequence.certifies(n_a, n, cuts[k])),
                        default=certified)
        if certified + 1 == len(cuts):
            break
        if sequence.futile(n_a, n, cuts[certified + 1]):
            break
    radius = radius_from_lower(sequence.lower(n_a, n), sigma)
    if certified >= 0:
        radius = max(radii[certified], radius or 0.0)
    return (ABSTAIN, 0.0, n, n_a) if radius is None else (c_a, radius, n, n_a)


def mixture_job(n0: int, n_max: int, alpha: float, sigma: float, radii) -> Job:
    """Adaptive certification with the beta-binomial mixture confidence sequence (method 'mixture')."""
    return sequential_job(n0, sigma, radii, lambda n_a0, n0: MixtureSequence.from_selection(n_max, alpha, n_a0, n0))


def union_job(n0: int, n_max: int, alpha: float, sigma: float, radii, naive: bool = False) -> Job:
    """Adaptive certification with alpha split over looks 32, 64, ..., n_max (method 'union'); `naive` spends
    alpha at every look (not valid: for comparison)."""
    return sequential_job(n0, sigma, radii, lambda n_a0, n0: UnionOfLooks(n_max, alpha, naive))


def counts_job(phase: str, n: int) -> Job:
    """The class counts of n samples of one phase (PREDICT decides on them)."""
    return (yield phase, n, n)


# -- running them -------------------------------------------------------------------------------------------------

@dataclass
class _Active:
    index: int
    x: torch.Tensor
    job: Job
    phase: str = ""
    need: int = 0
    counts: torch.Tensor | None = None
    streams: dict[str, NoiseStream] = field(default_factory=dict)


def run_jobs(classify: Callable[[torch.Tensor], torch.Tensor], num_classes: int, sigma: float, seed: int,
             items: Iterable[tuple[int, torch.Tensor, Job]], batch_size: int,
             device: torch.device) -> Iterator[tuple[int, object]]:
    """Run every job of `items` ((example index, image [C, H, W], job)) and yield (index, result) as each job
    finishes. `classify` maps a batch of noisy images to predicted classes; batches hold at most batch_size
    samples, from as many images as it takes to fill them (images are admitted while fewer samples are asked
    for than one batch holds)."""
    items, active = iter(items), deque()
    finished: list[tuple[int, object]] = []
    pending = True

    def advance(a: _Active, counts) -> bool:
        """Send the counts of the current request (None to start); False once the job has finished."""
        try:
            phase, need, total = a.job.send(counts)
        except StopIteration as stop:
            finished.append((a.index, stop.value))
            return False
        if phase not in a.streams:
            a.streams[phase] = NoiseStream(a.x.shape, total, functools.partial(
                block_seed, seed, sigma, a.index, phase), device)
        a.phase, a.need = phase, need
        a.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        return True

    with torch.inference_mode():
        while True:
            while pending and sum(a.need for a in active) < batch_size:
                item = next(items, None)
                if item is None:
                    pending = False
                    break
                index, x, job = item
                a = _Active(index, x.to(device=device, dtype=torch.float32), job)
                if advance(a, None):
                    active.append(a)
            yield from finished
            finished.clear()
            if not active:
                return
            segments, space = [], batch_size
            for a in active:
                m = min(a.need, space)
                if m:
                    segments.append((a, m, a.streams[a.phase].take(m).mul_(sigma).add_(a.x)))
                    space -= m
                if not space:
                    break
            predictions = classify(torch.cat([noisy for _, _, noisy in segments]))
            sizes = torch.tensor([m for _, m, _ in segments], device=device)
            owner = torch.repeat_interleave(torch.arange(len(segments), device=device), sizes)
            counts = torch.bincount(owner * num_classes + predictions, minlength=len(segments) * num_classes)
            for (a, m, _), row in zip(segments, counts.view(len(segments), num_classes)):
                a.counts += row
                a.need -= m
                if not a.need and not advance(a, a.counts.cpu().numpy()):
                    active.remove(a)


