"""Certify a data set with randomized smoothing: one TSV row per example, resumable and shardable.

Output TSV: `idx label predict radius correct samples votes`, sorted by idx (predict -1 on abstain; samples: the
estimation samples used, N for CERTIFY; votes: how many of them voted the selected class cA, so votes / samples
estimates pA). It holds nothing that varies between runs, so a rerun writes the same bytes. Seconds per example
go to a separate timing file (never a DVC output).

Work file: each finished row is appended (fsync per row) with its seconds; its first line records the
certification parameters, its second is the header. A rerun with the same parameters skips the rows found
there; on completion the rows are written, sorted, to the output atomically and the work file is removed. Noise
is seeded by dataset index, so rows do not depend on shards, resumes, batch size or which images share a batch.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from dmae.smoothing.smooth import Smooth, check_certify_args, check_method
from dmae.util import distributed as dist
from dmae.util.errors import UserError
from dmae.util.io import atomic_write_text
from dmae.util.progress import progress_bar

COLUMNS = ["idx", "label", "predict", "radius", "correct", "samples", "votes"]
HEADER = "\t".join(COLUMNS)
WORK_HEADER = HEADER + "\tseconds"
TIMING_HEADER = "idx\tsamples\tseconds"


@dataclass(frozen=True)
class CertifyRow:
    idx: int
    label: int
    predict: int  # -1 on abstain
    radius: float
    correct: int  # 1 if predict == label
    samples: int  # estimation samples used
    votes: int  # of them, those whose class was cA (the selection's top class, predicted or not)
    seconds: float | None = field(default=None, compare=False)  # first sample to decision (work, timing files)

    def to_line(self) -> str:
        fields = (self.idx, self.label, self.predict, repr(float(self.radius)), self.correct, self.samples,
                  self.votes)
        return "\t".join(map(str, fields)) + "\n"

    def to_work_line(self) -> str:
        return self.to_line()[:-1] + f"\t{self.seconds:.4f}\n"


def _parse_row(path: Path, lineno: int, line: str, with_seconds: bool = False) -> CertifyRow:
    fields = line.split("\t")
    width = len(COLUMNS) + with_seconds
    if len(fields) != width:
        raise UserError(f"{path}:{lineno}: expected {width} tab-separated fields, got {len(fields)}: {line!r}")
    try:
        row = CertifyRow(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]), int(fields[4]),
                         int(fields[5]), int(fields[6]), float(fields[7]) if with_seconds else None)
    except ValueError:
        raise UserError(f"{path}:{lineno}: malformed row {line!r}") from None
    consistent = (
        row.idx >= 0
        and row.label >= 0
        and row.predict >= -1
        and row.correct == int(row.predict == row.label)
        and math.isfinite(row.radius)
        and row.radius >= 0
        and (row.predict != -1 or row.radius == 0)
        and row.samples >= 1
        and 0 <= row.votes <= row.samples
        and (row.seconds is None or row.seconds >= 0)
    )
    if not consistent:
        raise UserError(f"{path}:{lineno}: inconsistent row {line!r}")
    return row


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"certification file {path} does not exist") from None
    return text.split("\n")


def read_certify_tsv(path: str | os.PathLike) -> list[CertifyRow]:
    """Read a certification TSV, checking its header, every row, and that idx is strictly increasing."""
    path = Path(path)
    lines = _lines(path)
    if lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != HEADER:
        raise UserError(f"{path}:1: expected header {HEADER!r}, got {lines[0] if lines else ''!r}")
    rows = [_parse_row(path, lineno, line) for lineno, line in enumerate(lines[1:], start=2)]
    for lineno, (prev, row) in enumerate(zip(rows, rows[1:]), start=3):
        if row.idx <= prev.idx:
            raise UserError(f"{path}:{lineno}: idx {row.idx} after {prev.idx}; rows must be sorted by unique idx")
    return rows


def write_certify_tsv(path: str | os.PathLike, rows: Iterable[CertifyRow]) -> None:
    atomic_write_text(path, HEADER + "\n" + "".join(row.to_line() for row in rows))


def write_timing(path: str | os.PathLike, rows: Iterable[CertifyRow]) -> None:
    """Seconds and samples per example (rows resumed from an older work file without times are left out)."""
    lines = [f"{r.idx}\t{r.samples}\t{r.seconds:.4f}\n" for r in rows if r.seconds is not None]
    atomic_write_text(path, TIMING_HEADER + "\n" + "".join(lines))


def work_path(out_path: str | os.PathLike) -> Path:
    """The work file of out_path when the caller names none: beside it."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial")


def _read_work_file(path: Path, params_line: str) -> list[CertifyRow]:
    # Only lines ending in a newline are complete; a torn last line is what an interruption leaves.
    lines = _lines(path)[:-1]
    if lines[:1] != [params_line]:
        found = lines[0] if lines else ""
        raise UserError(
            f"{path}:1: work file of a run with other parameters ({found!r}, now {params_line!r}); "
            "delete it to start over"
        )
    if lines[1:2] != [WORK_HEADER]:
        raise UserError(f"{path}:2: expected header {WORK_HEADER!r}")
    return [_parse_row(path, lineno, line, with_seconds=True) for lineno, line in enumerate(lines[2:], start=3)]


def _resume(work: Path, params_line: str, todo: list[int], shard: tuple[int, int]) -> dict[int, CertifyRow]:
    """The rows already in the work file (if any), which is then rewritten to hold just them and the header."""
    done: dict[int, CertifyRow] = {}
    if work.exists():
        wanted = set(todo)
        for row in _read_work_file(work, params_line):
            if row.idx not in wanted:
                raise UserError(f"{work}: idx {row.idx} is not in shard {shard} of the indices; delete the file")
            if row.idx in done:
                raise UserError(f"{work}: idx {row.idx} appears more than once; delete the file")
            done[row.idx] = row
    # Rewriting drops a torn last line, so appended rows start on a line of their own.
    atomic_write_text(work, f"{params_line}\n{WORK_HEADER}\n" + "".join(r.to_work_line() for r in done.values()))
    return done


def _shard_indices(indices: Sequence[int], shard: tuple[int, int], size: int) -> list[int]:
    """The dataset indices of shard (i, k): positions p of `indices` with p % k == i."""
    try:
        i, k = (operator.index(v) for v in shard)
    except (TypeError, ValueError):
        raise UserError(f"shard must be a pair (i, k) of integers, got {shard!r}") from None
    if not 0 <= i < k:
        raise UserError(f"shard must be (i, k) with 0 <= i < k, got {shard!r}")
    try:
        indices = [operator.index(idx) for idx in indices]
    except TypeError:
        raise UserError("indices must be integers") from None
    seen = set()
    for idx in indices:
        if not 0 <= idx < size:
            raise UserError(f"indices: idx {idx} is outside the dataset of {size} examples")
        if idx in seen:
            raise UserError(f"indices: idx {idx} appears more than once")
        seen.add(idx)
    return indices[i::k]


def certify_examples(
    smooth: Smooth,
    dataset,
    indices: Sequence[int],
    *,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int,
    out_path: str | os.PathLike,
    method: str = "cohen",
    radii: Sequence[float] = (),
    shard: tuple[int, int] = (0, 1),
    work: str | os.PathLike | None = None,
    timing: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[CertifyRow]:
    """CERTIFY (or adaptive certification, at most n samples, the brackets of `radii`) dataset[idx] for this
    shard's share of `indices`; write the rows to out_path, sorted by idx, and their seconds to `timing`.

    dataset is sized and dataset[idx] gives (image [C, H, W] in [0, 1], int label). Resumes from the work file
    (`work`, default beside out_path) if there is one. Returns the rows written.
    """
    check_certify_args(n0=n0, n=n, alpha=alpha, batch_size=batch_size)
    check_method(method)
    todo = _shard_indices(indices, shard, len(dataset))
    out_path = Path(out_path)
    work = Path(work) if work is not None else work_path(out_path)
    params = {"n0": int(n0), "n": int(n), "alpha": float(alpha), "sigma": smooth.sigma, "seed": smooth.seed,
              "precision": smooth.precision, "method": method,
              **({"radii": [float(r) for r in radii]} if method != "cohen" else {})}
    params_line = "# " + json.dumps(params, sort_keys=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    done = _resume(work, params_line, todo, shard)
    labels = {}
    started: dict[int, float] = {}

    def images():
        for idx in todo:
            if idx not in done:
                image, labels[idx] = dataset[idx]
                started[idx] = time.perf_counter()
                yield idx, image

    with open(work, "a", encoding="utf-8") as fh, progress_bar(progress, unit="img") as bar:
        task = bar.add_task(f"certify {out_path.name}", total=len(todo), completed=len(done), status="")
        for idx, predict, radius, samples, votes in smooth.certify_all(
                images(), n0=n0, n=n, alpha=alpha, batch_size=batch_size, method=method, radii=radii):
            label = int(labels.pop(idx))
            seconds = round(time.perf_counter() - started.pop(idx), 4)  # as written: returned rows equal the file's
            row = CertifyRow(idx, label, predict, radius, int(predict == label), samples, votes, seconds)
            fh.write(row.to_work_line())
            fh.flush()
            os.fsync(fh.fileno())
            done[idx] = row
            bar.update(task, advance=1, status=f"{samples} samples")

    rows = sorted(done.values(), key=lambda row: row.idx)
    write_certify_tsv(out_path, rows)
    if timing is not None:
        write_timing(timing, rows)
    work.unlink()
    return rows


def merge_shards(
    shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, expected_indices: Iterable[int]
) -> list[CertifyRow]:
    """Merge shard TSVs into one sorted TSV, checking that every expected idx appears exactly once."""
    source: dict[int, Path] = {}
    rows = []
    for path in map(Path, shard_paths):
        for row in read_certify_tsv(path):
            if row.idx in source:
                raise UserError(f"idx {row.idx} appears in both {source[row.idx]} and {path}")
            source[row.idx] = path
            rows.append(row)
    expected = {int(idx) for idx in expected_indices}
    unexpected = sorted(source.keys() - expected)
    if unexpected:
        raise UserError(f"{source[unexpected[0]]}: idx {unexpected[0]} is not among the expected indices")
    missing = sorted(expected - source.keys())
    if missing:
        names = ", ".join(str(path) for path in shard_paths)
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UserError(f"{len(missing)} idx missing from the shard files {names}: {shown}")
    rows.sort(key=lambda row: row.idx)
    write_certify_tsv(out_path, rows)
    return rows


def shard_path(out_path: str | os.PathLike, i: int, k: int) -> Path:
    """Where shard i of k of the certification `out_path` is written before the shards are merged."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.shard-{i}-of-{k}{out_path.suffix}")


def certify_split(smooth: Smooth, dataset, out_path: str | os.PathLike, *, work_dir: str | os.PathLike,
                  timing: str | os.PathLike | None = None, shard: tuple[int, int] = (0, 1), progress: bool = True,
                  **certify) -> bool:
    """Certify every example of `dataset` into out_path, or only shard (i, k) into shard_path(out_path, i, k);
    `certify` are certify_examples' settings (n0, n, alpha, batch_size, method, radii).

    Work files go to work_dir. Under torchrun the processes split the work: process r certifies shard r of
    world_size into work_dir, then rank 0 merges the shards into out_path. Returns True where out_path now holds
    the whole split (rank 0 of a merged run, or an unsharded run), so the caller knows whether to write what
    belongs beside it.
    """
    i, k = shard
    work_dir = Path(work_dir)
    if dist.world_size() == 1:
        target = out_path if k == 1 else shard_path(out_path, i, k)
        certify_examples(smooth, dataset, range(len(dataset)), out_path=target, shard=(i, k),
                         work=work_dir / "work.tsv", timing=timing, progress=progress, **certify)
        return k == 1
    if k > 1:
        raise UserError("--shard and torchrun both split the work: use one of them")
    r, k = dist.rank(), dist.world_size()
    parts = [work_dir / f"shard-{s}-of-{k}.tsv" for s in range(k)]
    certify_examples(smooth, dataset, range(len(dataset)), out_path=parts[r], shard=(r, k),
                     work=work_dir / f"work-{r}-of-{k}.tsv", timing=work_dir / f"timing-{r}-of-{k}.tsv",
                     progress=progress and dist.is_main(), **certify)
    dist.barrier()
    if dist.is_main():
        merge_shards(parts, out_path, range(len(dataset)))
        if timing is not None:
            lines = [line for s in range(k) for line in
                     (work_dir / f"timing-{s}-of-{k}.tsv").read_text(encoding="utf-8").splitlines()[1:]]
            atomic_write_text(timing, TIMING_HEADER + "\n" + "".join(f"{line}\n" for line in sorted(
                lines, key=lambda line: int(line.split("\t")[0]))))
    return dist.is_main()
