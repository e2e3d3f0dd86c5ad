"""Trust: damaged or tampered bundles, hostile paths, bad inputs and signals.

Each case damages one thing (a bundle file, one manifest field, one input) in a private copy of one shared fp32 tiny
bundle and asserts what a user sees: one line `nucleus-export CMD: error: ... Fix: ...`, exit code 1 (2 for usage),
and nothing written (no output, no `.NAME.partial-*` temporary). The SIGTERM tests kill a real `export` process and
interrupt every other writer in the middle of its write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from nucleus_runtime.bundle import EngineRecord, LoweringRecord, file_record, load_manifest, sha256_file
from nucleus_runtime.contract import MANIFEST_NAME, PLUGIN_LIBRARY_PATH
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.records import to_json
from safetensors.numpy import save_file

from nucleus_export.cli import main

TEXT_DIM = 64  # the tiny model's joint_attention_dim
PLUGIN_NAMES_BLOB = b"\0".join(n.encode() for n in ("ExpertChoiceRouter", "MoECombine", "getCreators", "setLoggerFinder"))
# An ELF shared object header (ET_DYN) followed by the names the static library checks look for.
FAKE_PLUGIN = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + (3).to_bytes(2, "little") + PLUGIN_NAMES_BLOB


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the shared fp32 tiny bundle that a test may damage (without a report an earlier `check` may
    have added, so that tests can assert that none is written)."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("parity.json")))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    paths = []
    for name in ("prompt", "negative"):
        path = folder / f"{name}.safetensors"
        save_file({"prompt_embeds": rng.standard_normal((1, 8, TEXT_DIM)).astype(np.float32)}, str(path))
        paths.append(path)
    return paths[0], paths[1]


def edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    edit(manifest)
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


def make_plugin_bundle(bundle: Path) -> Path:
    """The bundle as `build --moe plugin` leaves it: placeholder engines and plugin library, all recorded."""
    (bundle / "plugins").mkdir()
    (bundle / PLUGIN_LIBRARY_PATH).write_bytes(FAKE_PLUGIN)
    for graph in ("text_kv", "denoiser"):
        (bundle / f"{graph}.plan").write_bytes(b"engine placeholder " + graph.encode())

    def edit(m: dict) -> None:
        for rel in ("text_kv.plan", "denoiser.plan", PLUGIN_LIBRARY_PATH):
            m["files"][rel] = to_json(file_record(bundle, rel))
        for graph in ("text_kv", "denoiser"):
            m["stages"][graph]["engines"] = {graph: to_json(EngineRecord("tensorrt", "10.8", LoweringRecord("plugin")))}
        m["plugins"] = {"library": PLUGIN_LIBRARY_PATH, "ops": ["ExpertChoiceRouter", "MoECombine"], "namespace": "nucleus",
                        "version": "1"}

    edit_manifest(bundle, edit)
    return bundle


def command(name: str, bundle: Path, out: Path, prompts: tuple[Path, Path], *extra: str) -> list[str]:
    if name == "run":
        return ["run", "--bundle", str(bundle), "--prompt-embeds", str(prompts[0]), "--negative-prompt-embeds",
                str(prompts[1]), "--height", "128", "--width", "128", "--steps", "1", "--out", str(out), *extra]
    if name == "check":
        return ["check", "--model", "tiny", "--bundle", str(bundle), *extra]
    return ["triton", "--bundle", str(bundle), "--repo", str(out), "--platform", "onnxruntime", *extra]


def assert_refused(argv: list[str], capsys, out: Path | None, code: int = 1, match: str | None = None) -> str:
    """main(argv) fails with one documented error line, the exit code, and leaves no output or temporary."""
    before = {p: p.stat().st_mtime_ns for p in out.parent.iterdir()} if out is not None else {}
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"nucleus-export {argv[0]}: error: ") and " Fix: " in lines[0], lines[0]
    assert "Traceback" not in err and "internal error" not in err
    if match is not None:
        assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists(), f"{out} was written"
        after = {p: p.stat().st_mtime_ns for p in out.parent.iterdir()}
        assert after == before, f"written next to {out}: {sorted(set(after) - set(before))}"
    return lines[0]


# ---- every bundle file, every damage, every command that reads a bundle -----------------------------------------

COMMANDS = ("run", "check", "triton")
BUNDLE_FILES = ("text_kv.onnx", "denoiser.onnx", "scheduler_config.json")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _symlink_outside(path: Path) -> None:
    """Same bytes, so the checksum matches, but the file lives outside the bundle."""
    root = next(p for p in path.parents if (p / MANIFEST_NAME).is_file())
    outside = root.parent / f"outside-{path.name}"
    shutil.copyfile(path, outside)
    path.unlink()
    path.symlink_to(outside)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


DAMAGES = {
    "truncate": (_truncate, "does not match its checksum"),
    "flip": (_flip, "does not match its checksum"),
    "delete": (Path.unlink, "is missing"),
    "folder": (_folder, "not a regular file"),
    "symlink-outside": (_symlink_outside, "leads outside"),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("relpath", BUNDLE_FILES)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_damaged_bundle_file(cmd, relpath, damage, bundle, prompts, tmp_path, capsys):
    apply, message = DAMAGES[damage]
    apply(bundle / relpath)
    out = tmp_path / ("out.safetensors" if cmd == "run" else "repo")
    assert_refused(command(cmd, bundle, out, prompts), capsys, out, match=message)
    assert not (bundle / "parity.json").exists()


def test_check_verifies_checksums_before_parity(bundle, capsys):
    """A changed byte fails in well under the parity run's time (the model is never even opened)."""
    _flip(bundle / "denoiser.onnx")
    started = time.perf_counter()
    assert_refused(["check", "--model", "/nonexistent-model", "--bundle", str(bundle)], capsys, None,
                   match="does not match its checksum")
    assert time.perf_counter() - started < 5


# ---- every manifest field ---------------------------------------------------------------------------------------

# A value of the wrong JSON type for each top-level field.
WRONG_TYPE = {
    "model_config": [1],
    "config_hash": 7,
    "precision": ["fp32"],
    "profiles": "128x128",
    "stages": [],
    "files": ["text_kv.onnx"],
    "quantization": "fp8",
    "plugins": "plugins/libnucleus_trt_plugins.so",
    "tools": ["onnx"],
    "format_version": "2",
}
REQUIRED = ("model_config", "config_hash", "precision", "profiles", "stages", "files")
# Damage inside fields: (name, edit, words of the error).
NESTED = {
    "profiles.batch": (lambda m: m["profiles"].__setitem__("batch", [2, 1, 1]), "profiles.batch"),
    "profiles.grids": (lambda m: m["profiles"].__setitem__("grids", [[8, 8]]), "grids"),
    "profiles.opt_resolution": (lambda m: m["profiles"].__setitem__("opt_resolution", [4, 4]), "opt_resolution"),
    "stages.denoiser": (lambda m: m["stages"].pop("denoiser"), "stages are ['text_kv']"),
    "stages.denoiser.io": (lambda m: m["stages"]["denoiser"].pop("io"), "stages.denoiser has no field 'io'"),
    "stages.text_kv.digest": (lambda m: m["stages"]["text_kv"].__setitem__("digest", 5), "stages.text_kv.digest"),
    "model_config.in_channels": (lambda m: m["model_config"].__setitem__("in_channels", "64"), "in_channels"),
    "files.sha256": (lambda m: m["files"]["text_kv.onnx"].__setitem__("sha256", "xyz"), "files.text_kv.onnx.sha256"),
    "files.bytes": (lambda m: m["files"]["text_kv.onnx"].__setitem__("bytes", "1"), "files.text_kv.onnx.bytes"),
    "files.text_kv.onnx removed": (lambda m: m["files"].pop("text_kv.onnx"), "text_kv.onnx is not recorded"),
    "files: all removed": (lambda m: m["files"].clear(), "is not recorded"),
    "unknown field": (lambda m: m.__setitem__("extra", 1), "unknown fields extra"),
    "format_version 3": (lambda m: m.__setitem__("format_version", 3), "format version 3"),
}
TRAVERSAL = {
    "files ../": lambda m: m["files"].__setitem__("../outside.onnx", m["files"]["text_kv.onnx"]),
    "files absolute": lambda m: m["files"].__setitem__("/etc/passwd", m["files"]["text_kv.onnx"]),
    "files backslash": lambda m: m["files"].__setitem__("..\\outside.onnx", m["files"]["text_kv.onnx"]),
    "files a/../b": lambda m: m["files"].__setitem__("a/../text_kv.onnx", m["files"]["text_kv.onnx"]),
    "plugins ../": lambda m: m.update(plugins={"library": "../lib.so", "ops": [], "namespace": "", "version": "1"}),
    "plugins absolute": lambda m: m.update(plugins={"library": "/usr/lib/x86_64-linux-gnu/libc.so.6", "ops": [],
                                                    "namespace": "", "version": "1"}),
    "segment name": lambda m: m["stages"]["denoiser"].__setitem__(
        "segments", [{"name": "../../denoiser.seg0", "blocks": [0, 5], "inputs": [], "outputs": [], "digest": "x"}]),
}


def _manifest_case(bundle: Path, cmd: str, prompts, tmp_path: Path, edit, capsys, match: str | None) -> None:
    edit_manifest(bundle, edit)
    out = tmp_path / ("out.safetensors" if cmd == "run" else "repo")
    assert_refused(command(cmd, bundle, out, prompts), capsys, out, match=match)
    assert not (bundle / "parity.json").exists()


@pytest.mark.parametrize("field", WRONG_TYPE)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_manifest_field_of_wrong_type(cmd, field, bundle, prompts, tmp_path, capsys):
    _manifest_case(bundle, cmd, prompts, tmp_path, lambda m: m.__setitem__(field, WRONG_TYPE[field]), capsys,
                   f"manifest.json: {field} is")


@pytest.mark.parametrize("field", REQUIRED)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_manifest_field_missing(cmd, field, bundle, prompts, tmp_path, capsys):
    _manifest_case(bundle, cmd, prompts, tmp_path, lambda m: m.pop(field), capsys, f"no field '{field}'")


@pytest.mark.parametrize("case", NESTED)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_manifest_nested_damage(cmd, case, bundle, prompts, tmp_path, capsys):
    edit, match = NESTED[case]
    _manifest_case(bundle, cmd, prompts, tmp_path, edit, capsys, match)


@pytest.mark.parametrize("case", TRAVERSAL)
@pytest.mark.parametrize("cmd", COMMANDS)
def test_manifest_path_outside_bundle(cmd, case, bundle, prompts, tmp_path, capsys):
    _manifest_case(bundle, cmd, prompts, tmp_path, TRAVERSAL[case], capsys, "not a relative path inside")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "not json"])
def test_damaged_manifest_file(damage, bundle, prompts, tmp_path, capsys):
    path = bundle / MANIFEST_NAME
    pinned = sha256_file(path)
    if damage == "not json":
        path.write_text("{")
    elif damage == "delete":
        path.unlink()
    else:
        (_truncate if damage == "truncate" else _flip)(path)
    out = tmp_path / "out.safetensors"
    # A flipped byte may still parse; the pinned hash catches it whatever it changed.
    assert_refused(command("run", bundle, out, prompts, "--expect-manifest-sha256", pinned), capsys, out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_pinned_manifest_hash(cmd, bundle, prompts, tmp_path, capsys):
    """--expect-manifest-sha256 catches what checksums cannot: a consistent edit of a file and its recorded hash."""
    pinned = sha256_file(bundle / MANIFEST_NAME)
    scheduler = bundle / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    config["shift"] = 9.0
    scheduler.write_text(json.dumps(config))
    edit_manifest(bundle, lambda m: m["files"].__setitem__("scheduler_config.json", to_json(file_record(bundle, "scheduler_config.json"))))
    out = tmp_path / ("out.safetensors" if cmd == "run" else "repo")
    assert_refused(command(cmd, bundle, out, prompts, "--expect-manifest-sha256", pinned), capsys, out,
                   match="not the pinned")


def test_pinned_manifest_hash_accepts_the_trusted_bundle(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    pinned = sha256_file(bundle / MANIFEST_NAME).upper()  # as some tools print it
    assert main(command("triton", bundle, repo, (None, None), "--expect-manifest-sha256", pinned)) == 0
    assert (repo / "nucleus_pipeline" / "1" / MANIFEST_NAME).is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        main(command("triton", bundle, tmp_path / "r2", (None, None), "--expect-manifest-sha256", "abc"))
    assert info.value.code == 2 and "is not a sha256" in capsys.readouterr().err


# ---- native code: the plugin library ----------------------------------------------------------------------------


def _triton_plan(bundle: Path, out: Path) -> list[str]:
    # bls: the layout whose repository holds the library Triton's TensorRT backend preloads
    return ["triton", "--bundle", str(bundle), "--repo", str(out), "--platform", "tensorrt_plan", "--layout", "bls"]


def test_plugin_bundle_writes_verified_library(bundle, tmp_path):
    make_plugin_bundle(bundle)
    repo = tmp_path / "repo"
    assert main(_triton_plan(bundle, repo)) == 0
    assert (repo / "nucleus_denoiser" / PLUGIN_LIBRARY_PATH).read_bytes() == FAKE_PLUGIN


PLUGIN_DAMAGES = {
    "truncate": (lambda b: _truncate(b / PLUGIN_LIBRARY_PATH), "does not match its checksum"),
    "flip": (lambda b: _flip(b / PLUGIN_LIBRARY_PATH), "does not match its checksum"),
    "delete": (lambda b: (b / PLUGIN_LIBRARY_PATH).unlink(), "is missing"),
    "symlink-outside": (lambda b: _symlink_outside(b / PLUGIN_LIBRARY_PATH), "leads outside"),
    "plugins null": (lambda b: edit_manifest(b, lambda m: m.update(plugins=None)), "no plugins record"),
    "not in files": (lambda b: edit_manifest(b, lambda m: m["files"].pop(PLUGIN_LIBRARY_PATH)), "has no checksum"),
    "record incomplete": (lambda b: edit_manifest(b, lambda m: m["plugins"].pop("ops")), "has no field 'ops'"),
    "library absolute": (
        lambda b: edit_manifest(b, lambda m: m["plugins"].update(library=str(b / PLUGIN_LIBRARY_PATH))),
        "not a relative path inside",
    ),
    "library ../": (lambda b: edit_manifest(b, lambda m: m["plugins"].update(library="../lib.so")), "not a relative path"),
}


@pytest.mark.parametrize("damage", PLUGIN_DAMAGES)
def test_tampered_plugin_library_is_never_copied(damage, bundle, tmp_path, capsys):
    apply, match = PLUGIN_DAMAGES[damage]
    make_plugin_bundle(bundle)
    apply(bundle)
    out = tmp_path / "repo"
    assert_refused(_triton_plan(bundle, out), capsys, out, match=match)


class _Registry:
    def __init__(self):
        self.loaded: list[str] = []

    def load_library(self, path):
        self.loaded.append(path)
        raise RuntimeError("stop after recording the path")

    def get_creator(self, name, version, namespace):
        return None


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    """The TensorRT backend up to the plugin load, with a registry that records what it is asked to load."""
    from types import SimpleNamespace

    from nucleus_runtime.backends import tensorrt as trt_backend

    registry = _Registry()
    fake = SimpleNamespace(__name__="tensorrt", get_plugin_registry=lambda: registry)
    monkeypatch.setattr(trt_backend, "_import_tensorrt", lambda flavor: fake)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: None)
    monkeypatch.setattr(trt_backend.TensorRTBackend, "_check_gpu", lambda self: None)
    return trt_backend.TensorRTBackend, registry


def test_runtime_loads_the_recorded_library_after_verifying(bundle, fake_tensorrt):
    """The library loaded is the one at the path the manifest records, not whatever sits at the default path."""
    backend, registry = fake_tensorrt
    make_plugin_bundle(bundle)
    recorded = "engines/plugins/libnucleus_trt_plugins.so"
    (bundle / recorded).parent.mkdir(parents=True)
    shutil.move(bundle / PLUGIN_LIBRARY_PATH, bundle / recorded)
    (bundle / PLUGIN_LIBRARY_PATH).write_bytes(FAKE_PLUGIN + b"decoy")  # unrecorded: must never be loaded

    def edit(m: dict) -> None:
        m["files"][recorded] = m["files"].pop(PLUGIN_LIBRARY_PATH)
        m["plugins"]["library"] = recorded

    edit_manifest(bundle, edit)
    with pytest.raises(NucleusError, match="could not load"):
        backend(bundle)
    assert registry.loaded == [str((bundle / recorded).resolve())]


@pytest.mark.parametrize("damage", PLUGIN_DAMAGES)
@pytest.mark.parametrize("skip_checksums", [False, True])
def test_runtime_never_loads_a_tampered_library(damage, skip_checksums, bundle, fake_tensorrt):
    backend, registry = fake_tensorrt
    apply, match = PLUGIN_DAMAGES[damage]
    make_plugin_bundle(bundle)
    apply(bundle)
    with pytest.raises(NucleusError, match=match):
        backend(bundle, manifest=None, verify_checksums=not skip_checksums)
    assert registry.loaded == []


def test_run_tensorrt_refuses_tampered_plugin_even_with_skip_checksums(bundle, prompts, tmp_path, capsys):
    make_plugin_bundle(bundle)
    _flip(bundle / PLUGIN_LIBRARY_PATH)
    out = tmp_path / "out.safetensors"
    argv = command("run", bundle, out, prompts, "--backend", "tensorrt", "--skip-checksums")
    assert_refused(argv, capsys, out, match="does not match its checksum")


# ---- bad inputs to `run` ----------------------------------------------------------------------------------------


def _embeds(tmp_path: Path, name: str, **tensors: np.ndarray) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def _good(shape=(1, 8, TEXT_DIM), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape).astype(dtype)


def _nan() -> np.ndarray:
    x = _good()
    x[0, 3, 5] = np.nan
    return x


def _inf() -> np.ndarray:
    x = _good()
    x[0, 0, 0] = np.inf
    return x


BAD_PROMPTS = {
    "nan": (lambda: {"prompt_embeds": _nan()}, "NaN or infinite"),
    "inf": (lambda: {"prompt_embeds": _inf()}, "NaN or infinite"),
    "int32": (lambda: {"prompt_embeds": np.ones((1, 8, TEXT_DIM), np.int32)}, "dtype int32"),
    "no tokens": (lambda: {"prompt_embeds": np.zeros((1, 0, TEXT_DIM), np.float32)}, "no tokens"),
}


@pytest.mark.parametrize("case", BAD_PROMPTS)
@pytest.mark.parametrize("which", ["prompt", "negative"])
def test_bad_prompt_embeddings(case, which, bundle, prompts, tmp_path, capsys):
    make, match = BAD_PROMPTS[case]
    bad = _embeds(tmp_path, "bad", **make())
    pair = (bad, prompts[1]) if which == "prompt" else (prompts[0], bad)
    out = tmp_path / "out.safetensors"
    assert_refused(command("run", bundle, out, pair), capsys, out, match=match)


@pytest.mark.parametrize("guidance", ["nan", "inf", "-1"])
def test_bad_guidance(guidance, bundle, prompts, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert_refused(command("run", bundle, out, prompts, "--guidance", guidance), capsys, out, match="guidance")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_bad_initial_latents(value, bundle, prompts, tmp_path, capsys):
    latents = np.zeros((1, 64, 64), np.float32)  # 128x128 pixels: an 8x8 patch grid
    latents[0, 5, 7] = value
    path = _embeds(tmp_path, "latents", latents=latents)
    out = tmp_path / "out.safetensors"
    assert_refused(command("run", bundle, out, prompts, "--latents", str(path)), capsys, out, match="latents holds 1 NaN")


def test_runtime_checks_are_shared_with_triton(tiny_bundle):
    """The Triton pipeline model refuses the same inputs with the same words (the checks live in the runtime)."""
    from nucleus_runtime.pipeline import generate
    from nucleus_runtime.scheduler import SchedulerConfig

    manifest = load_manifest(tiny_bundle)
    scheduler = SchedulerConfig.from_file(tiny_bundle / "scheduler_config.json")
    kwargs = {"height": 128, "width": 128, "steps": 1, "seed": 0}
    with pytest.raises(NucleusError, match="NaN or infinite"):
        generate(None, manifest, scheduler, _nan(), guidance=1.0, **kwargs)
    with pytest.raises(NucleusError, match="guidance nan"):
        generate(None, manifest, scheduler, _good(), guidance=float("nan"), **kwargs)


def test_float16_embeddings_are_converted_with_a_warning(bundle, prompts, tmp_path, capsys):
    half = _embeds(tmp_path, "half", prompt_embeds=_good(dtype=np.float16))
    out = tmp_path / "out.safetensors"
    assert main(command("run", bundle, out, (half, prompts[1]))) == 0
    assert "float16; converting it to float32" in capsys.readouterr().err
    assert out.is_file()


def test_out_in_missing_folder_is_refused_and_not_created(bundle, prompts, tmp_path, capsys):
    out = tmp_path / "missing" / "o.safetensors"
    assert_refused(command("run", bundle, out, prompts), capsys, None, code=2, match="does not exist")
    assert not out.parent.exists()


@pytest.mark.parametrize("cmd", ["export", "triton"])
def test_output_folder_in_missing_parent_is_refused_and_not_created(cmd, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "missing" / "out"
    if cmd == "export":
        argv = ["export", "--model", "tiny", "--out", str(out), "--resolutions", "128x128", "--max-text-len", "8"]
    else:
        argv = ["triton", "--bundle", str(tiny_bundle), "--repo", str(out), "--platform", "onnxruntime"]
    assert_refused(argv, capsys, None, code=2, match="does not exist")
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_file_is_not_called_a_shard(bundle, prompts, tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    out = tmp_path / "out.safetensors"
    line = assert_refused(command("run", bundle, out, (empty, prompts[1])), capsys, out, match="input file")
    assert "shard" not in line and "empty" in line


# ---- checkpoints: safetensors headers and the index ------------------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


BAD_HEADERS = {
    "unknown dtype": ({"a": _entry("F4", [2], 0, 8)}, 8, "unsupported dtype"),
    "negative offset": ({"a": _entry("F32", [2], -8, 0)}, 8, "malformed"),
    "negative dim": ({"a": _entry("F32", [-2], 0, 8)}, 8, "malformed"),
    "end before begin": ({"a": _entry("F32", [0], 8, 0)}, 8, "offsets"),
    "size mismatch": ({"a": _entry("F32", [3], 0, 8)}, 8, "needs 12 bytes"),
    "overlap": ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, 12, "overlapping"),
    "gap": ({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, 12, "gap"),
    "trailing bytes": ({"a": _entry("F32", [1], 0, 4)}, 8, "belong to none"),
    "out of range": ({"a": _entry("F32", [4], 0, 16)}, 8, "truncated"),
    "not an object": ([1, 2], 0, "not a JSON object"),
    "float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, "malformed"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_safetensors_header_fully_validated(case, tmp_path):
    from nucleus_export.model.checkpoint import read_safetensors_header

    header, nbytes, match = BAD_HEADERS[case]
    path = _safetensors(tmp_path / "x.safetensors", header, bytes(nbytes))
    with pytest.raises(NucleusError, match=match):
        read_safetensors_header(path)


def test_safetensors_header_accepts_any_order_and_empty_tensors(tmp_path):
    from nucleus_export.model.checkpoint import read_safetensors_header

    header = {"b": _entry("F32", [1], 4, 8), "a": _entry("BF16", [2], 0, 4), "e": _entry("F32", [0], 8, 8),
              "__metadata__": {"format": "pt"}}
    infos = read_safetensors_header(_safetensors(tmp_path / "x.safetensors", header, bytes(8)))
    assert sorted(infos) == ["a", "b", "e"] and infos["e"].nbytes == 0


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_weight_map_stays_inside_the_checkpoint(shard, checkpoint_copy):
    from nucleus_export.model.checkpoint import INDEX_NAME, open_checkpoint

    index = json.loads((checkpoint_copy / INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    (checkpoint_copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(NucleusError, match="not a relative path inside"):
        open_checkpoint(checkpoint_copy)


def test_index_shard_symlink_outside_is_refused(checkpoint_copy, tmp_path):
    from nucleus_export.model.checkpoint import INDEX_NAME, open_checkpoint

    index = json.loads((checkpoint_copy / INDEX_NAME).read_text())
    shard = checkpoint_copy / min(index["weight_map"].values())
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(NucleusError, match="leads outside"):
        open_checkpoint(checkpoint_copy)


# ---- CLI surface ------------------------------------------------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nucleus_export.cli", *args], capture_output=True, text=True, **kwargs)


def test_bad_argument_value_is_a_usage_line_not_a_traceback():
    result = _cli("inspect", "--model", "tiny", "--resolutions", "1024by1024")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not HEIGHTxWIDTH" in lines[0] and "Fix:" in lines[0], result.stderr


def test_verbose_before_the_subcommand(tmp_path):
    result = _cli("-v", "inspect", "--model", str(tmp_path))
    assert result.returncode == 1 and "Traceback" in result.stderr
    result = _cli("inspect", "-v", "--model", str(tmp_path))
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_check_failure_is_the_documented_error_line(tiny_bundle, tmp_path, capsys):
    """A bundle checked against another checkpoint: one `error: ... Fix: ...` line, exit 1 (not a dict)."""
    from nucleus_export.model.tiny import write_checkpoint

    other = write_checkpoint(tmp_path / "other", seed=7)
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    assert main(["check", "--model", str(other), "--bundle", str(bundle)]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # progress logs (INFO) come first
    errors = [line for line in err if "error" in line.lower() or "{" in line]
    assert errors == [err[-1]] and err[-1].startswith("nucleus-export check: error: ") and "Fix:" in err[-1], err


# ---- nothing left behind: signals -------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_sigterm_during_export_leaves_nothing(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nucleus_export.cli", "export", "--model", "tiny", "--out", str(out),
         "--resolutions", "128x128", "--max-text-len", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    try:
        # Mid-way: the temporary folder exists and already holds a written graph.
        while not any(p.is_file() for p in tmp_path.glob(".b.partial-*/*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "export never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "left behind after SIGTERM"


@pytest.fixture(params=[signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def signal_mid_write(request, monkeypatch):
    """Patch `owner.attr` (a function called while writing) to do its work, then receive the signal."""

    def patch(owner, attr: str) -> None:
        original = getattr(owner, attr)

        def write_then_signal(*args, **kwargs):
            original(*args, **kwargs)  # the write happens, then the signal arrives
            os.kill(os.getpid(), request.param)
            time.sleep(1)  # the handler runs at the next bytecode; the sleep is never finished
            raise AssertionError("the signal did not interrupt the write")

        monkeypatch.setattr(owner, attr, write_then_signal)

    return patch


def test_signal_during_tiny_checkpoint_write(signal_mid_write, tmp_path):
    from diffusers import NucleusMoEImageTransformer2DModel

    from nucleus_export.model.tiny import write_checkpoint

    signal_mid_write(NucleusMoEImageTransformer2DModel, "save_pretrained")
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_signal_during_triton_repository_write(signal_mid_write, tiny_bundle, tmp_path):
    from nucleus_export.triton import repository

    signal_mid_write(repository.shutil, "copyfile")
    plan = repository.plan_repository(tiny_bundle, repository.TritonOptions(platform="onnxruntime"))
    with pytest.raises(KeyboardInterrupt):
        repository.write_repository(plan, tmp_path / "repo")
    assert list(tmp_path.iterdir()) == []


def test_signal_during_run_output_write(signal_mid_write, tmp_path):
    import safetensors.numpy

    from nucleus_export.commands.run import write_latents

    signal_mid_write(safetensors.numpy, "save_file")
    with pytest.raises(KeyboardInterrupt):
        write_latents(tmp_path / "o.safetensors", np.zeros((1, 4, 64), np.float32), {})
    assert list(tmp_path.iterdir()) == []


def test_signal_during_bundle_write_keeps_the_old_bundle(signal_mid_write, tiny_checkpoint, tmp_path):
    """export/build write through atomic_dir: an interrupted --force leaves the previous bundle intact."""
    from nucleus_export import export

    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("old bundle")
    signal_mid_write(export, "write_graphs")
    options = export.ExportOptions(resolutions=[(128, 128)], max_text_len=8)
    with pytest.raises(KeyboardInterrupt):
        export.export_bundle(tiny_checkpoint, out, options, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (out / "keep").read_text() == "old bundle"


def test_signal_during_build_leaves_nothing(signal_mid_write, tiny_checkpoint, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    from nucleus_export import build
    from nucleus_export.export import ExportOptions

    signal_mid_write(build, "write_graphs")
    options = build.BuildOptions(flavor="tensorrt-rtx", quality=False)
    with pytest.raises(KeyboardInterrupt):
        build.build_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(resolutions=[(128, 128)], max_text_len=8), options)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writers_restore_the_sigterm_handler(tmp_path):
    from nucleus_runtime.atomic import atomic_dir, write_atomic

    before = signal.getsignal(signal.SIGTERM)
    with atomic_dir(tmp_path / "d") as tmp:
        write_atomic(tmp / "f", "x")
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert (tmp_path / "d" / "f").read_text() == "x" and _leftovers(tmp_path) == []


def test_a_test_session_leaves_no_temporary_folders(tmp_path):
    """conftest's private model cache is removed when the session ends (pytest's own basetemp aside)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NUCLEUS_EXPORT_CACHE", "TORCHINDUCTOR_CACHE_DIR")}
    env["TMPDIR"] = str(temp)
    test = "tests/test_trust.py::test_safetensors_header_accepts_any_order_and_empty_tensors"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}", test],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(temp.iterdir()) == []
