"""Logging and progress display shared by every command.

Progress goes to stderr through rich so that stdout stays clean for reports; ``--verbose`` lowers the log level to
DEBUG and makes errors print their traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
logger = logging.getLogger("nucleus_export")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=console, show_path=verbose, show_time=verbose, markup=False)
    root = logging.getLogger("nucleus_export")
    root.handlers[:] = [handler]
    root.setLevel(level)
    runtime_log = logging.getLogger("nucleus_runtime")
    runtime_log.handlers[:] = [handler]
    runtime_log.setLevel(level)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
        disable=not console.is_terminal and logging.getLogger("nucleus_export").level > logging.INFO,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr; logs start and end so non-interactive logs show progress too."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    logger.info("%s (%d items)", description, total)
    with _progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide INFO logs of repeated inner work (e.g. the exports of FP8 probes) unless --verbose asked for DEBUG."""
    previous = logger.level
    if previous > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
    """Log a long stage and show a spinner-like bar while it runs."""
    logger.info("%s ...", description)
    with _progress() as progress:
        progress.add_task(description, total=None)
        yield
    logger.debug("%s done", description)


class PhaseProgress:
    """Nested phases reported by a long native job (TensorRT's IProgressMonitor) as progress bars on stderr; when
    stderr is not a terminal, top-level phases are logged as they start and finish so a piped log shows progress.

    Call it with (event, phase, step, total), event in "start", "step", "finish"; thread-safe callers only."""

    def __init__(self, description: str):
        self.description = description
        self._progress = _progress()
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> PhaseProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, event: str, phase: str, step: int, total: int) -> None:
        label = f"{self.description}: {phase}"
        if event == "start":
            if not self._tasks and not console.is_terminal:
                logger.info("%s ...", label)
            self._tasks[phase] = self._progress.add_task(label, total=max(total, 1))
        elif event == "step" and phase in self._tasks:
            self._progress.update(self._tasks[phase], completed=step)
        elif event == "finish" and phase in self._tasks:
            self._progress.remove_task(self._tasks.pop(phase))
            if not self._tasks and not console.is_terminal:
                logger.info("%s done", label)
