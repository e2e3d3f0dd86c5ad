"""Atomic writes of files and folders: readers never see half an output, and nothing half-written stays behind.

Every output (bundle folders, engines, manifests, model repositories, latents, the tiny checkpoint) is written to a
hidden sibling, `.NAME.partial-XXXX`, and renamed onto NAME only when complete. A failure, Ctrl-C (SIGINT) or a
SIGTERM (a CI timeout, `kill`) removes the sibling. SIGTERM's default action kills the process without running any
cleanup, so while an atomic write is open SIGTERM raises `Terminated` in the main thread instead, which unwinds the
stack like Ctrl-C's KeyboardInterrupt. Signals are held back while a temporary is created or removed, so a signal
can never leave a temporary that no cleanup knows about.

A signal handler only runs when the main thread is back in Python: a long call into native code (a TensorRT engine
build) finishes before the cleanup runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from nucleus_runtime.errors import NucleusError

PARTIAL_INFIX = ".partial-"
OLD_INFIX = ".old-"
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that cleanup runs; a KeyboardInterrupt so code handles both alike."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


_depth = 0
_previous_handler: object = None


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While open, SIGTERM raises Terminated (SIGINT already raises KeyboardInterrupt). Nests; main thread only
    (Python runs signal handlers there; elsewhere, e.g. in a Triton model thread, the process keeps its handlers)."""
    global _depth, _previous_handler
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # an ignored SIGTERM stays so
        yield
        return
    if _depth == 0:
        _previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            # None: a handler installed outside Python, which cannot be put back; the default is the closest.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if _previous_handler is None else _previous_handler)  # type: ignore[arg-type]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (they are delivered when this closes) around creating or removing a temporary."""
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):  # POSIX only
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _readable_mode(path: Path, mode: int) -> None:
    # mkstemp/mkdtemp make private (0600/0700) entries; outputs are ordinary artifacts (a Triton server running as
    # another user must read a model repository).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    if not parent.is_dir():
        raise NucleusError(
            f"cannot write {path}: its folder {parent} does not exist.",
            f"create {parent} first, or choose an output path in an existing folder.",
        )
    return parent


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer to fill (a library's save function); on success it is
    renamed onto `path`, on any failure or signal it is removed. The folder of `path` must exist."""
    path = Path(path)
    parent = _existing_parent(path)
    with signals_raise():
        with _signals_held():
            fd, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_INFIX}", dir=parent)
            os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _readable_mode(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with _signals_held():
                tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | memoryview | str) -> None:
    """Write bytes or text through a temporary sibling, fsync, rename into place."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path` (an existing one is moved
    aside first and deleted last), on any failure or signal it is removed and `path` is left as it was.

    Refusing to replace an existing `path` is the caller's decision (commands ask for --force); the folder of `path`
    must exist, so a mistyped --out never creates folders elsewhere.
    """
    path = Path(path).absolute()
    parent = _existing_parent(path)
    with signals_raise():
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL_INFIX}", dir=parent))
        old: Path | None = None
        try:
            _readable_mode(tmp, 0o755)
            yield tmp
            with _signals_held():
                if path.exists() or path.is_symlink():
                    old = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD_INFIX}", dir=parent))
                    os.replace(path, old / path.name)
                os.replace(tmp, path)
        finally:
            with _signals_held():
                _remove(tmp)
                if old is not None:
                    _remove(old)
