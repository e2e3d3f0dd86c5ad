"""Registering the nucleus plugin library with the builder's TensorRT, through the runtime's own checks."""

from __future__ import annotations

from pathlib import Path

from nucleus_runtime.bundle import sha256_file
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.plugins import find_plugin_library, load_plugin_library

from nucleus_export.engines.flavors import TensorRTFlavor
from nucleus_export.errors import NucleusExportError


def load_plugins(flavor: TensorRTFlavor, library: Path) -> tuple[Path, str]:
    """Check the nucleus plugin library and register its creators with the flavor's plugin registry.

    The checks and the loading are the runtime's (nucleus_runtime.plugins), so a library the build accepts is one
    the runtime accepts. Its errors say how to build the library; the build adds its alternative, the native lowering.
    The checksum taken here, before loading, is the one the bundle records: the copy shipped in the bundle is then
    verified against it, so the bundle carries exactly the bytes the engines were built with.

    Returns:
        The resolved library path and its sha256.
    """
    try:
        path = find_plugin_library(library)
        sha256 = sha256_file(path)
        return load_plugin_library(path, flavor.trt, sha256=sha256), sha256
    except NucleusError as exc:
        fix = f"{exc.fix.rstrip('.')}; or use --moe native." if exc.fix else "use --moe native."
        raise NucleusExportError(exc.problem, fix) from exc
