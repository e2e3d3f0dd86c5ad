"""Bad input to `build`: every refusal names the problem and the fix, before any long work starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nucleus_runtime.bundle import Profiles

from nucleus_export.cli import main
from nucleus_runtime import gpu
from nucleus_runtime.errors import NucleusError

from nucleus_export.engines.flavors import TensorRTFlavor, resolve_flavor
from nucleus_export.engines.plugins import load_plugins
from nucleus_export.engines.profiles import profile_shapes, validate_dim_ranges
from nucleus_export.errors import NucleusExportError, UsageError

pytest.importorskip("tensorrt_rtx")

TINY_ARGS = ["--model", "tiny", "--resolutions", "128x128", "--max-text-len", "16", "--skip-quality"]


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """Make both modules unimportable (a None entry in sys.modules makes `import` raise ImportError)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)


def test_no_tensorrt_names_the_extras(no_tensorrt):
    with pytest.raises(NucleusExportError) as info:
        resolve_flavor("auto")
    assert ".[tensorrt-rtx]'" in str(info.value) and ".[tensorrt]'" in str(info.value)
    with pytest.raises(NucleusExportError, match=r"runtime\[tensorrt-rtx\]"):
        resolve_flavor("tensorrt-rtx")
    with pytest.raises(NucleusExportError, match=r"runtime\[tensorrt\]"):
        resolve_flavor("tensorrt")


def test_cli_without_tensorrt_fails_before_exporting(no_tensorrt, tmp_path, capsys):
    assert main(["build", *TINY_ARGS, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert ".[tensorrt-rtx]'" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_full_tensorrt_without_gpu_is_refused(monkeypatch):
    """Full TensorRT needs a GPU to build. `tensorrt` cannot be installed here, so the (API-identical) TensorRT-RTX
    module stands in under its name; the refusal comes from the GPU check, which this exercises for real."""
    import tensorrt_rtx

    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_rtx)
    monkeypatch.setenv("NUCLEUS_EXPORT_ASSUME_NO_GPU", "1")
    with pytest.raises(NucleusExportError, match="needs a CUDA GPU") as info:
        resolve_flavor("tensorrt")
    assert "tensorrt-rtx" in str(info.value)
    # auto falls back to TensorRT-RTX, which builds on the CPU.
    assert resolve_flavor("auto").name == "tensorrt-rtx"


def test_gpu_probe_reads_the_driver_and_cuda_visible_devices(tmp_path, monkeypatch):
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        assert gpu.cuda_device_count() == 0
    # A driver with three GPUs, narrowed as the CUDA runtime narrows it.
    for index in range(3):
        (tmp_path / f"0000:0{index}:00.0").mkdir()
    monkeypatch.setattr(gpu, "NVIDIA_PROC_GPUS", tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.cuda_device_count() == 3
    for visible, expected in (("1", 1), ("0,2", 2), ("", 0), ("-1", 0), ("0,-1,2", 1), ("GPU-abc,MIG-def", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpu.cuda_device_count() == expected, visible
    monkeypatch.setenv("NUCLEUS_EXPORT_ASSUME_NO_GPU", "1")
    assert gpu.cuda_device_count() == 0


def test_unknown_backend():
    with pytest.raises(UsageError):
        resolve_flavor("tensorflow")


def test_plugin_lowering_needs_a_library(tmp_path, capsys):
    assert main(["build", *TINY_ARGS, "--out", str(tmp_path / "b"), "--moe", "plugin"]) == 2
    assert "--plugins" in capsys.readouterr().err


def test_plugins_refused_with_tensorrt_rtx(tmp_path, capsys):
    """TensorRT-RTX 1.7 aborts the process when a plugin layer is added: refused before any work, one line."""
    library = tmp_path / "libnucleus_trt_plugins.so"
    assert main(["build", *TINY_ARGS, "--out", str(tmp_path / "b"), "--plugins", str(library), "--backend",
                 "tensorrt-rtx"]) == 1
    err = capsys.readouterr().err
    assert "TensorRT-RTX 1.7 cannot build networks with plugin layers" in err and "--moe native" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def _load_into_rtx(library: Path) -> None:
    load_plugins(resolve_flavor("tensorrt-rtx"), library)


def test_missing_plugin_library(tmp_path):
    missing = tmp_path / "libnucleus_trt_plugins.so"
    with pytest.raises(NucleusExportError) as info:
        _load_into_rtx(missing)
    assert "does not exist" in str(info.value) and str(missing) in str(info.value)
    assert info.value.fix.endswith("or use --moe native.")


def test_library_that_is_not_a_plugin_library():
    not_plugins = Path(subprocess.run(["gcc", "-print-file-name=libm.so.6"], capture_output=True, text=True).stdout.strip())
    if not not_plugins.is_file():
        pytest.skip("no libm to load")
    with pytest.raises(NucleusExportError, match="not the nucleus TensorRT plugins") as info:
        _load_into_rtx(not_plugins)
    assert info.value.fix.endswith("or use --moe native.")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_plugin_library_lacking_the_ops(tmp_path):
    """A library with the plugin names and entry points that registers no creators: it passes the static checks of
    nucleus_runtime.plugins, and TensorRT-RTX's registry refuses to load it."""
    source = tmp_path / "empty_plugins.c"
    source.write_text(
        'const char* nucleus_names[] = {"ExpertChoiceRouter", "MoECombine"};\n'
        "void setLoggerFinder(void* finder) { (void)finder; }\n"
        "void* const* getCreators(int* nb) { *nb = 0; return 0; }\n"
    )
    library = tmp_path / "libnucleus_trt_plugins.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    with pytest.raises(NucleusExportError, match="refused plugin library") as info:
        _load_into_rtx(library)
    assert info.value.fix.endswith("or use --moe native.")


class _LoadsNothing:
    """A plugin registry that accepts a library but finds no creator afterwards."""

    def load_library(self, path):
        return object()

    def get_creator(self, name, version, namespace):
        return None


def test_registry_without_the_nucleus_ops(tmp_path):
    """The build's loading is the runtime's: a registry without the creators lists both missing nucleus ops."""
    from types import SimpleNamespace

    from nucleus_runtime.plugins import ENTRY_SYMBOLS, PLUGIN_NAMES

    library = tmp_path / "libnucleus_trt_plugins.so"
    elf_shared_object = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + (3).to_bytes(2, "little")
    library.write_bytes(elf_shared_object + b"\0".join(n.encode() for n in (*PLUGIN_NAMES, *ENTRY_SYMBOLS)))
    fake_trt = SimpleNamespace(get_plugin_registry=_LoadsNothing)
    flavor = TensorRTFlavor("tensorrt-rtx", fake_trt, "0")
    with pytest.raises(NucleusExportError, match="no creator for ExpertChoiceRouter, MoECombine") as info:
        load_plugins(flavor, library)
    assert "namespace 'nucleus', version '1'" in info.value.problem
    assert info.value.fix.endswith("or use --moe native.")


@pytest.mark.parametrize("bad", [(2, 1, 2), (0, 1, 2), (1, 3, 2), (1, 2)])
def test_impossible_profile_ranges(bad):
    with pytest.raises(NucleusExportError, match="profile range"):
        validate_dim_ranges({"batch": bad})
    # A bundle's profiles refuse the same ranges where they are made (and read back from a manifest).
    with pytest.raises(NucleusError, match="profiles.batch"):
        Profiles(batch=bad, text_len=(1, 2, 3), resolutions=[(16, 16)], grids=[(1, 1)], opt_resolution=(16, 16))


def test_profile_needs_every_symbolic_dim():
    with pytest.raises(NucleusExportError, match="text_len"):
        profile_shapes({"mask": ["batch", "text_len"]}, {"batch": (1, 2, 2)})


def test_cli_impossible_text_range(tmp_path, capsys):
    code = main(["build", *TINY_ARGS[:4], "--max-text-len", "16", "--opt-text-len", "64", "--out", str(tmp_path / "b")])
    assert code == 2
    assert "impossible" in capsys.readouterr().err


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["build", *TINY_ARGS, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
