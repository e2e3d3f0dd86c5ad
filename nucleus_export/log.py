"""Logging and progress display shared by every command.

Progress goes to stderr through rich so that stdout stays clean for reports; ``--verbose`` lowers the log level to
DEBUG and makes errors print their traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
def stage(description: str) -> Iterator[None]:
    """Log a long stage and show a spinner-like bar while it runs."""
    logger.info("%s ...", description)
    with _progress() as progress:
        progress.add_task(description, total=None)
        yield
    logger.debug("%s done", description)
