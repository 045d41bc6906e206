"""Logs and progress on stderr; results never go to the terminal.

`log` and `say` print text as it is: never read as rich markup (a value or path may hold "[...]"), never wrapped
mid-word, so log files keep one line per message. `progress_bar` is a rich bar (rate, ETA) on a terminal; when
stderr is a file or a pipe (a scheduler's log, `dvc repro > log`) it prints a progress line instead, every
`LOG_EVERY` of the work or every `LOG_SECONDS`, whichever comes first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)
LOG_EVERY = 0.05  # a progress line every 5 % of a task's work ...
LOG_SECONDS = 60.0  # ... or every minute


def say(text: str, style: str | None = None) -> None:
    """One message on stderr, as it is."""
    console.print(Text(str(text), style=style or ""), soft_wrap=True)


def log(text: str) -> None:
    """One time-stamped message on stderr, as it is."""
    say(f"[{time.strftime('%H:%M:%S')}] {text}")


class RateColumn(ProgressColumn):
    """Items per second in the bar's own unit (images/s, samples/s)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


class _Task:
    def __init__(self, description: str, total: float, completed: float, status: str):
        self.description, self.total, self.completed, self.status = description, total, completed, status
        self.start, self.start_completed = time.monotonic(), completed
        self.logged_at, self.logged_completed = self.start, completed


class LogProgress:
    """The part of rich's Progress the stages use, printing lines at a steady pace instead of a bar."""

    def __init__(self, unit: str, enabled: bool):
        self.unit, self.enabled, self.tasks = unit, enabled, []

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for task in self.tasks:
                if task.completed != task.logged_completed:
                    self._line(task)

    def add_task(self, description: str, total: float, completed: float = 0, status: str = "") -> int:
        self.tasks.append(_Task(description, total, completed, status))
        return len(self.tasks) - 1

    def update(self, task_id: int, advance: float = 0, status: str | None = None, **_) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        if status is not None:
            task.status = status
        now = time.monotonic()
        step = LOG_EVERY * task.total if task.total else float("inf")
        if task.completed - task.logged_completed >= step or (advance and now - task.logged_at >= LOG_SECONDS):
            self._line(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task: _Task) -> None:
        task.logged_at, task.logged_completed = time.monotonic(), task.completed
        if not self.enabled:
            return
        elapsed = task.logged_at - task.start
        rate = (task.completed - task.start_completed) / elapsed if elapsed > 0 else 0.0
        left = (task.total - task.completed) / rate if rate and task.total else None
        share = f" ({100 * task.completed / task.total:.0f} %)" if task.total else ""
        eta = f", eta {left:.0f} s" if left is not None else ""
        status = f"; {task.status}" if task.status else ""
        log(f"{task.description}: {task.completed:,.0f}/{task.total:,.0f}{share}, {rate:,.1f} {self.unit}/s{eta}"
            f"{status}")


def _process_start() -> float | None:
    """When this process started (Unix time; Linux only, to 10 ms), from /proc."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def record_work_start() -> None:
    """With DMAE_TIMINGS set (a file), append when this process started and when its main work starts (its
    first progress bar): `dmae bench-pipeline` reads the start-up time of every stage from it."""
    target = os.environ.get("DMAE_TIMINGS")
    if not target or getattr(record_work_start, "done", False):
        return
    record_work_start.done = True
    entry = {"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv[1:], "pid": os.getpid(),
             "process_start": _process_start(), "work_start": time.time()}
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def progress_bar(enabled: bool = True, unit: str = "it") -> Progress | LogProgress:
    """done/total, rate, elapsed, ETA and a free-text `status` field (pass status="" when adding a task)."""
    record_work_start()
    if not console.is_terminal:
        return LogProgress(unit, enabled)
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        console=console,
        disable=not enabled,
    )
