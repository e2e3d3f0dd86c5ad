"""Find and load libnucleus_trt_plugins.so, the TensorRT plugins of the `plugin` MoE lowering.

The library exports `getCreators` / `setLoggerFinder` and registers two IPluginV3 creators, ExpertChoiceRouter and
MoECombine (namespace "nucleus", version "1"). A bundle ships it as `plugins/libnucleus_trt_plugins.so`; engines
built with `--moe plugin` cannot be deserialized without it. No torch here: numpy and the backend only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nucleus_runtime.bundle import Manifest, PluginRecord, sha256_file, verify_files
from nucleus_runtime.contract import CUSTOM_OPS as PLUGIN_NAMES
from nucleus_runtime.contract import PLUGIN_NAMESPACE, PLUGIN_VERSION
from nucleus_runtime.contract import PLUGIN_LIBRARY_NAME as LIBRARY_NAME
from nucleus_runtime.errors import NucleusError

ENTRY_SYMBOLS = ("getCreators", "setLoggerFinder")

_BUILD_FIX = (
    "build it with `cmake -S plugins -B build -DTENSORRT_ROOT=/path/to/TensorRT && cmake --build build` "
    "(see plugins/README.md) and pass build/" + LIBRARY_NAME
)


def find_plugin_library(path: str | Path) -> Path:
    """Resolve and sanity-check the plugin library without loading it.

    Args:
        path: the .so itself, a bundle directory (uses plugins/libnucleus_trt_plugins.so) or a directory holding
            the library.

    Returns:
        The resolved path of an ELF shared object that names both plugins and the loader entry points.

    Raises:
        NucleusError: the file is missing, is not an ELF shared object, or lacks the nucleus plugins.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / "plugins" / LIBRARY_NAME, p / LIBRARY_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise NucleusError(
                f"No {LIBRARY_NAME} in {p} (looked for {', '.join(str(c) for c in candidates)}).",
                f"pass the library file itself, or {_BUILD_FIX}.",
            )
        p = found
    if not p.exists():
        raise NucleusError(f"Plugin library {p} does not exist.", _BUILD_FIX + ".")
    if not p.is_file():
        raise NucleusError(f"Plugin library {p} is not a regular file.", _BUILD_FIX + ".")
    with p.open("rb") as f:
        header = f.read(18)
    if len(header) < 18 or header[:4] != b"\x7fELF":
        raise NucleusError(f"{p} is not an ELF shared object (no ELF header).", _BUILD_FIX + ".")
    byteorder = "little" if header[5] == 1 else "big"
    e_type = int.from_bytes(header[16:18], byteorder)
    if e_type != 3:  # ET_DYN
        kind = {1: "a relocatable object (.o)", 2: "an executable"}.get(e_type, f"ELF type {e_type}")
        raise NucleusError(f"{p} is {kind}, not a shared library.", _BUILD_FIX + ".")
    data = p.read_bytes()
    missing = [name for name in (*PLUGIN_NAMES, *ENTRY_SYMBOLS) if name.encode() not in data]
    if missing:
        raise NucleusError(
            f"{p} is a shared library but not the nucleus TensorRT plugins: it lacks {', '.join(missing)}.",
            f"point to {LIBRARY_NAME} built from plugins/ (not libnucleus_kernels.so, which has no TensorRT glue); "
            + _BUILD_FIX
            + ".",
        )
    return p.resolve()


def bundle_plugin_library(bundle_dir: Path, manifest: Manifest) -> tuple[Path, str] | None:
    """The plugin library a bundle's engines need, verified: the path the manifest records (inside the bundle) and
    its recorded sha256, checked against the file. None when the engines use no plugins (load_manifest refuses plugin
    engines without a plugins record).

    Always verified, whatever the caller's checksum setting: loading the library runs its native code.
    """
    if manifest.plugins is None:
        return None
    relpath = manifest.plugins.library
    verify_files(bundle_dir, manifest, [relpath])
    return Path(bundle_dir) / relpath, manifest.files[relpath].sha256


def load_plugin_library(
    path: str | Path, trt_module: Any = None, sha256: str | None = None, record: PluginRecord | None = None
) -> Path:
    """Check the library and register its creators with TensorRT's plugin registry.

    Args:
        path: as for find_plugin_library.
        trt_module: the imported `tensorrt` (or `tensorrt_rtx`) module. None: only the static checks of
            find_plugin_library run (for backends that do not use TensorRT, e.g. to validate a bundle).
        sha256: the checksum the library must have (from a bundle's manifest, or taken by the build that records
            it); required to load, and checked right before the registry opens the file.
        record: the bundle's plugins record: the ops, namespace and version its engines were built with (default:
            this runtime's contract).

    Returns:
        The resolved library path.

    Raises:
        NucleusError: the checks of find_plugin_library, the registry refusing the library, or the two creators
            not being registered afterwards.
    """
    lib = find_plugin_library(path)
    if trt_module is None:
        return lib
    wanted = record or PluginRecord(str(LIBRARY_NAME), list(PLUGIN_NAMES), PLUGIN_NAMESPACE, PLUGIN_VERSION)
    registry = trt_module.get_plugin_registry()
    if not _creators_registered(registry, wanted):
        if sha256 is None:
            raise NucleusError(f"refusing to load {lib} without a checksum to verify it.", "load it from a bundle.")
        actual = sha256_file(lib)
        if actual != sha256:
            raise NucleusError(
                f"plugin library {lib} has sha256 {actual}, not the recorded {sha256}: it was changed.",
                "copy the bundle again, or build it again; never load a library you cannot verify.",
            )
        try:
            handle = registry.load_library(str(lib))
        except Exception as exc:  # the bindings raise on a failed dlopen (missing CUDA runtime, wrong ABI)
            raise NucleusError(
                f"TensorRT could not load plugin library {lib}: {exc}",
                "check that it was built against this TensorRT major version and that libcudart is on "
                "LD_LIBRARY_PATH.",
            ) from exc
        if handle is None:
            raise NucleusError(
                f"TensorRT refused plugin library {lib} (IPluginRegistry.load_library returned nothing).",
                "rebuild it against this TensorRT version; the TensorRT log above says why.",
            )
    missing = [name for name in wanted.ops if _get_creator(registry, name, wanted) is None]
    if missing:
        raise NucleusError(
            f"After loading {lib}, TensorRT has no creator for {', '.join(missing)} "
            f"(namespace {wanted.namespace!r}, version {wanted.version!r}).",
            "rebuild the library from plugins/ against this TensorRT version.",
        )
    return lib


def _get_creator(registry: Any, name: str, record: PluginRecord) -> Any:
    getter = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    try:
        return getter(name, record.version, record.namespace)
    except Exception:  # some bindings raise instead of returning None for an unknown creator
        return None


def _creators_registered(registry: Any, record: PluginRecord) -> bool:
    return all(_get_creator(registry, name, record) is not None for name in record.ops)
