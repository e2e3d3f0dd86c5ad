"""A real tritonserver on this machine, from the `nvidia-pytriton` wheel, for the tests and the load benchmark.

The wheel (in the `dev` and `triton` extras) ships `tritonserver` (2.51), its Python backend and per-Python stubs,
but no backend folder in the layout the server wants: `find_local_triton` assembles one (the Python backend with this
interpreter's stub next to `libtriton_python.so`) and `LocalTriton.env` the environment (the wheel's libraries and
Python's on LD_LIBRARY_PATH; this interpreter's bin folder first on PATH, since the 2.51 stub embeds the first
`python3` on PATH and ignores PYTHONPATH). `running_server` starts the server with the command
`serving.server_command` builds (the one the repository's README shows) on free loopback ports and stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from nucleus_export.errors import NucleusExportError
from nucleus_export.triton import serving

READY_TIMEOUT_S = 120.0


def wheel_unavailable_reason() -> str | None:
    """Why the nvidia-pytriton wheel cannot be installed here, or None where it can (manylinux_2_35 x86_64)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"nvidia-pytriton ships for Linux x86_64 only (this is {sys.platform} {platform.machine()})"
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
        return f"nvidia-pytriton needs glibc >= 2.35 (this is {libc} {version})"
    return None


@dataclasses.dataclass(frozen=True)
class LocalTriton:
    """tritonserver, a backend folder holding the Python backend with this Python's stub, and the wheel's libraries."""

    server: Path
    backends: Path
    libs: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(self.libs), sysconfig.get_config_var("LIBDIR")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        # The stub takes its prefix from the first `python3` on PATH: this interpreter's bin folder first gives it
        # this environment's site-packages (numpy, onnxruntime, tokenizers).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def find_local_triton(backends: Path) -> LocalTriton:
    """The wheel's server, with a backend folder assembled under `backends` (created)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise NucleusExportError(
            "nvidia-pytriton is not installed, so there is no tritonserver to start.",
            wheel_unavailable_reason() or "pip install -e '.[dev]' (or '.[triton]').",
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    python_tag = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / python_tag / "triton_python_backend_stub"
    if not stub.is_file():
        raise NucleusExportError(f"nvidia-pytriton has no Python backend stub for Python {python_tag}.",
                                 "use a Python the wheel has a stub for (its python_backend_stubs folder).")  # fmt: skip
    python_backend = Path(backends) / "python"
    if not (python_backend / stub.name).is_file():
        shutil.copytree(root / "backends" / "python", python_backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, python_backend / stub.name)  # the Python backend looks for its stub next to its library
    return LocalTriton(root / "bin" / "tritonserver", Path(backends), root.parent.parent / "nvidia_pytriton.libs")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running tritonserver on loopback ports: `url(protocol)` for clients, `log()` for failures."""

    def __init__(self, process: subprocess.Popen, http_port: int, grpc_port: int, metrics_port: int | None, log_path: Path):
        self.process, self.http_port, self.grpc_port, self.log_path = process, http_port, grpc_port, log_path
        self.metrics_port = metrics_port
        self.start_seconds = 0.0

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.http_port if protocol == 'http' else self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self, tail: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])

    def stop(self) -> None:
        """Stop the server (it unloads the models, ending their stub processes), then kill whatever is left of its
        process group."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=15)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and its stubs (its process group), as a crash would end them."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)


def wait_until_ready(server: Server, wait_ready: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
    import tritonclient.http as tritonclient_http

    # Closed when done: the server's shutdown waits (up to its exit timeout) for open HTTP connections.
    with contextlib.closing(tritonclient_http.InferenceServerClient(server.url("http"))) as client:
        deadline = time.monotonic() + timeout
        while True:
            if server.process.poll() is not None:
                raise AssertionError(f"tritonserver exited with {server.process.returncode}:\n{server.log()}")
            with contextlib.suppress(Exception):  # connection refused until the HTTP endpoint is up
                if client.is_server_ready() if wait_ready else client.is_server_live():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"tritonserver not ready after {timeout:.0f} s:\n{server.log()}")
            time.sleep(0.1)


@contextlib.contextmanager
def running_server(
    triton: LocalTriton, repo: Path, log_path: Path, wait_ready: bool = True, metrics: bool = False, **extra: str
) -> Iterator[Server]:
    """Start tritonserver on `repo`; wait until it is ready (or only live, with wait_ready=False); always stop it.

    Args:
        metrics: serve Prometheus metrics (the model's custom metrics included) on a free port.
        extra: more tritonserver options, `log_verbose="1"` for `--log-verbose=1`.
    """
    http_port, grpc_port = free_port(), free_port()
    metrics_port = free_port() if metrics else None
    command = serving.server_command(
        str(repo),
        executable=str(triton.server),
        backend_directory=str(triton.backends),
        address="127.0.0.1",
        http_port=http_port,
        grpc_port=grpc_port,
        metrics=metrics,
    )
    argv = command.argv + [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    if metrics_port is not None:
        argv += [f"--metrics-port={metrics_port}", "--metrics-address=127.0.0.1"]
    env = {**triton.env(), **command.env}
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        # Its own process group, so that stop() reaches the Python stubs it forks too.
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, http_port, grpc_port, metrics_port, log_path)
    try:
        wait_until_ready(server, wait_ready)
        server.start_seconds = time.perf_counter() - start
        yield server
    finally:
        server.stop()


def read_metrics(url: str, timeout: float = 10.0) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The Prometheus text of a metrics endpoint: metric name -> {sorted (label, value) pairs: value}."""
    import re
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a loopback URL we started
        text = response.read().decode()
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line.strip())
        if match is None or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
        metrics.setdefault(match.group(1), {})[labels] = float(match.group(3))
    return metrics
