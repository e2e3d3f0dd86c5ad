"""`nucleus-export triton`: generated configs against Triton's own ModelConfig schema and the ONNX graphs, both
layouts and what they place in the repository, writing (hard links, atomic replace), and the refusals (no engines,
TensorRT-RTX engines for Triton's TensorRT backend, non-empty folder, bad names) with fixes that name real commands.

What Triton reads is checked here: config.pbtxt (parsed with tritonclient's model_config_pb2) and the files the
configs point at. tests/test_triton_server.py starts a real tritonserver on generated repositories.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from nucleus_runtime.backends.registry import BackendOptions
from nucleus_runtime.backends.registry import open_backend as _open_backend
from nucleus_runtime.bundle import EngineRecord, LoweringRecord, PluginRecord, file_record, load_manifest
from nucleus_runtime.contract import CHECKPOINT_LINKS_DIR, MANIFEST_NAME
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.triton import model as pipeline_model
from onnx import TensorProto

from nucleus_export.cli import build_parser, main
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.graph.precision import GraphPrecision
from nucleus_export.model.specs import open_model
from nucleus_export.triton import schema
from nucleus_export.triton.configs import BLS, INPROCESS, ONNXRUNTIME, TENSORRT_PLAN
from nucleus_export.triton.names import ModelNames, validate_model_name
from nucleus_export.triton.repository import (
    RepoFile,
    TritonOptions,
    plan_repository,
    write_repository,
)

pb2 = schema.load_model_config_pb2()
pytestmark = pytest.mark.skipif(pb2 is None, reason="tritonclient (Triton's ModelConfig schema) is not installed")

ONNX_TO_TRITON = {
    TensorProto.FLOAT: pb2.TYPE_FP32 if pb2 else None,
    TensorProto.BFLOAT16: pb2.TYPE_BF16 if pb2 else None,
    TensorProto.FLOAT16: pb2.TYPE_FP16 if pb2 else None,
    TensorProto.INT64: pb2.TYPE_INT64 if pb2 else None,
}
PLUGIN_LIB = "plugins/libnucleus_trt_plugins.so"


def _export(root: Path, compute: str) -> Path:
    options = ExportOptions(
        precision=GraphPrecision(compute), resolutions=[(128, 128), (128, 256)], max_text_len=32, opt_text_len=16
    )
    export_bundle(open_model("tiny"), root, options)
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("triton") / "bundle", "fp32")


@pytest.fixture(scope="module")
def bf16_bundle(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("triton") / "bundle_bf16", "bf16")


def with_engines(bundle: Path, dest: Path, plugins: bool, backend: str = "tensorrt") -> Path:
    """A copy of the bundle as `nucleus-export build` leaves it: engine files and their manifest records.

    The engine bytes are placeholders: the repository writer copies engines and never reads them, and no TensorRT
    that could deserialize a real one runs here.
    """
    shutil.copytree(bundle, dest)
    manifest = load_manifest(dest)
    files, stages = dict(manifest.files), dict(manifest.stages)
    lowering = LoweringRecord("plugin") if plugins else LoweringRecord("native", "onehot")
    for graph in ("text_kv", "denoiser"):
        (dest / f"{graph}.plan").write_bytes(b"engine placeholder " + graph.encode())
        files[f"{graph}.plan"] = file_record(dest, f"{graph}.plan")
        stages[graph] = dataclasses.replace(stages[graph], engines={graph: EngineRecord(backend, "0", lowering)})
    plugin_record = None
    if plugins:
        (dest / "plugins").mkdir()
        (dest / PLUGIN_LIB).write_bytes(b"\x7fELF placeholder")
        files[PLUGIN_LIB] = file_record(dest, PLUGIN_LIB)
        plugin_record = PluginRecord(PLUGIN_LIB, ["ExpertChoiceRouter", "MoECombine"], "nucleus", "1")
    manifest = dataclasses.replace(manifest, files=files, stages=stages, plugins=plugin_record)
    (dest / MANIFEST_NAME).write_text(manifest.to_json())
    return dest


def parse(text: str):
    return schema.parse_model_config(text)


def assert_matches_graph(config, graph: onnx.ModelProto) -> None:
    """Names, element types and ranks of config inputs/outputs equal the ONNX graph's; fixed sizes equal too."""
    for side, values in (("input", graph.graph.input), ("output", graph.graph.output)):
        declared = {t.name: t for t in getattr(config, side)}
        assert set(declared) == {v.name for v in values}, side
        for v in values:
            tensor = v.type.tensor_type
            entry = declared[v.name]
            assert entry.data_type == ONNX_TO_TRITON[tensor.elem_type], v.name
            assert len(entry.dims) == len(tensor.shape.dim), v.name
            for size, dim in zip(entry.dims, tensor.shape.dim):
                assert size == (-1 if dim.dim_param else dim.dim_value), v.name


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("platform", [ONNXRUNTIME, TENSORRT_PLAN])
def test_configs_parse_and_match_onnx_graphs(request, tmp_path, compute, platform):
    source = request.getfixturevalue("bundle" if compute == "fp32" else "bf16_bundle")
    bundle = with_engines(source, tmp_path / "b", plugins=False) if platform == TENSORRT_PLAN else source
    plan = plan_repository(bundle, TritonOptions(layout=BLS, platform=platform, instances=2))
    configs = {name: parse(text) for name, text in plan.configs().items()}
    assert set(configs) == {"nucleus_text_kv", "nucleus_denoiser", "nucleus_pipeline"}
    kind = pb2.ModelInstanceGroup.KIND_GPU if platform == TENSORRT_PLAN else pb2.ModelInstanceGroup.KIND_CPU
    for graph in ("text_kv", "denoiser"):
        config = configs[f"nucleus_{graph}"]
        assert config.name == f"nucleus_{graph}"
        assert config.max_batch_size == 0
        assert [(g.kind, g.count) for g in config.instance_group] == [(kind, 2)]
        if platform == TENSORRT_PLAN:
            assert config.platform == "tensorrt_plan"
        else:
            assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
        assert_matches_graph(config, onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False))
    if compute == "bf16":
        kv_out = {t.name: t for t in configs["nucleus_text_kv"].output}["text_kv"]
        assert kv_out.data_type == pb2.TYPE_BF16

    pipeline = configs["nucleus_pipeline"]
    assert pipeline.backend == "python" and pipeline.max_batch_size == 0
    # Embeddings in, latents out: the bundle has no text encoder or VAE (and bls runs neither).
    assert [t.name for t in pipeline.input] == [s.name for s in pipeline_model.served_specs(pipeline_model.PIPELINE_INPUTS, set())]
    assert "prompt" not in [t.name for t in pipeline.input]
    assert [t.name for t in pipeline.output] == [pipeline_model.OUTPUT_LATENTS]
    assert {t.name for t in pipeline.input if not t.optional} == {"prompt_embeds"}
    assert list({t.name: t for t in pipeline.input}["prompt_embeds"].dims) == [-1, -1, 64]
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert params[pipeline_model.PARAM_LAYOUT] == BLS
    assert params[pipeline_model.PARAM_TEXT_KV_MODEL] == "nucleus_text_kv"
    assert params[pipeline_model.PARAM_DENOISER_MODEL] == "nucleus_denoiser"
    assert [(g.kind, g.count) for g in pipeline.instance_group] == [(pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert not pipeline.HasField("dynamic_batching")


@pytest.mark.parametrize("platform", [ONNXRUNTIME, TENSORRT_PLAN])
def test_inprocess_is_one_model_owning_the_bundle_files(bundle, tmp_path, platform):
    source = with_engines(bundle, tmp_path / "b", plugins=True) if platform == TENSORRT_PLAN else bundle
    plan = plan_repository(source, TritonOptions(layout=INPROCESS, platform=platform, instances=2, onnxruntime_threads=3))
    configs = {name: parse(text) for name, text in plan.configs().items()}
    assert set(configs) == {"nucleus_pipeline"}
    pipeline = configs["nucleus_pipeline"]
    assert pipeline.backend == "python" and pipeline.max_batch_size == 0
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert params[pipeline_model.PARAM_LAYOUT] == INPROCESS
    assert params[pipeline_model.PARAM_VERIFY_CHECKSUMS] == "true"
    # The engines' instance owns the GPU work, so Triton must give it a device; ONNX Runtime serves on the CPU.
    kind = pb2.ModelInstanceGroup.KIND_GPU if platform == TENSORRT_PLAN else pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.kind, g.count) for g in pipeline.instance_group] == [(kind, 2)]
    assert pipeline_model.PARAM_TEXT_KV_MODEL not in params
    version = {f.relpath.removeprefix("nucleus_pipeline/1/") for f in plan.files if f.relpath.startswith("nucleus_pipeline/1/")}
    if platform == TENSORRT_PLAN:
        assert params[pipeline_model.PARAM_BACKEND] == "tensorrt"
        assert {"text_kv.plan", "denoiser.plan", PLUGIN_LIB} <= version and not any(".onnx" in f for f in version)
    else:
        assert params[pipeline_model.PARAM_BACKEND] == "onnxruntime" and params[pipeline_model.PARAM_THREADS] == "3"
        assert {"text_kv.onnx", "denoiser.onnx"} <= version and not any(f.endswith(".plan") for f in version)
    assert {"model.py", MANIFEST_NAME, "scheduler_config.json", "nucleus_runtime/pipeline.py"} <= version


def test_text_kv_bytes_per_token_of_the_real_model(bundle):
    from nucleus_runtime.bundle import GraphIO, TensorSpec

    from nucleus_export.triton.serving import text_kv_bytes_per_token

    manifest = load_manifest(bundle)
    # The real model: 32 blocks, 4 K/V heads x 128, bf16 text K/V; CFG as a batch of 2.
    real_io = GraphIO({}, {"text_kv": TensorSpec("bfloat16", [32, 2, "batch", "text_len", 4, 128])})
    stages = {**manifest.stages, "text_kv": dataclasses.replace(manifest.stages["text_kv"], io=real_io)}
    assert text_kv_bytes_per_token(dataclasses.replace(manifest, stages=stages)) == 128 * 1024
    tiny = manifest.io["text_kv"].outputs["text_kv"]
    layers, _, _, _, kv_heads, head_dim = tiny.shape
    per_token = layers * 2 * 2 * kv_heads * head_dim * 4  # fp32 bundle
    assert text_kv_bytes_per_token(manifest) == per_token
    readme = next(f.text for f in plan_repository(bundle, TritonOptions(platform=ONNXRUNTIME)).files if f.relpath == "README.md")
    assert f"{per_token / 1024:g} KiB per text token" in readme


def test_inprocess_version_folder_is_a_bundle_the_runtime_opens(bundle, tmp_path):
    repo = tmp_path / "repo"
    assert main(["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime"]) == 0
    version = repo / "nucleus_pipeline" / "1"
    for name in ("text_kv.onnx", "denoiser.onnx", "scheduler_config.json"):
        # Hard links where the file system allows (here: the same tmp file system), so no multi-GB copies.
        assert os.path.samefile(version / name, bundle / name), name
    backend = _open_backend(version, "onnxruntime", options=BackendOptions(device="cpu"))  # checks every graph file against the manifest
    backend.close()


def test_queue_delay_and_prefix(bundle):
    plan = plan_repository(bundle, TritonOptions(layout=BLS, platform=ONNXRUNTIME, queue_timeout_us=250_000, name_prefix="fp32_"))
    configs = {name: parse(text) for name, text in plan.configs().items()}
    assert set(configs) == {"fp32_nucleus_text_kv", "fp32_nucleus_denoiser", "fp32_nucleus_pipeline"}
    pipeline = configs["fp32_nucleus_pipeline"]
    policy = pipeline.dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == 250_000
    assert policy.timeout_action == pb2.ModelQueuePolicy.REJECT
    params = {k: v.string_value for k, v in pipeline.parameters.items()}
    assert params[pipeline_model.PARAM_DENOISER_MODEL] == "fp32_nucleus_denoiser"
    for name, config in configs.items():
        assert config.name == name


def test_written_tensorrt_repository_with_plugins(bundle, tmp_path):
    built = with_engines(bundle, tmp_path / "built", plugins=True)
    repo = tmp_path / "repo"
    assert main(["triton", "--bundle", str(built), "--repo", str(repo), "--layout", "bls"]) == 0
    for graph in ("text_kv", "denoiser"):
        assert (repo / f"nucleus_{graph}/1/model.plan").read_bytes() == (built / f"{graph}.plan").read_bytes()
    plugin = repo / "nucleus_denoiser" / PLUGIN_LIB
    assert plugin.read_bytes() == (built / PLUGIN_LIB).read_bytes()
    readme = (repo / "README.md").read_text()
    assert f"LD_PRELOAD=REPO/nucleus_denoiser/{PLUGIN_LIB} tritonserver --model-repository=REPO" in readme
    assert "--backend-config=tensorrt,plugins=" in readme
    example_inputs = re.findall(r'^    \("(\w+)", ', readme, flags=re.M)
    assert "prompt_embeds" in example_inputs
    assert set(example_inputs) <= {s.name for s in pipeline_model.PIPELINE_INPUTS}
    for model in ("nucleus_text_kv", "nucleus_denoiser", "nucleus_pipeline"):
        assert parse((repo / model / "config.pbtxt").read_text()).name == model
    version = repo / "nucleus_pipeline" / "1"
    assert (version / "model.py").read_text() == Path(pipeline_model.__file__).read_text()
    assert (version / "nucleus_runtime" / "pipeline.py").is_file()
    assert load_manifest(version).engine("denoiser").lowering.moe == "plugin"
    assert not list(tmp_path.glob(".repo.*")), "temporary folders left behind"


def test_plugin_bundle_without_library_is_refused(bundle, tmp_path):
    built = with_engines(bundle, tmp_path / "built", plugins=True)
    (built / PLUGIN_LIB).unlink()
    with pytest.raises(NucleusExportError, match="plugin library"):
        plan_repository(built, TritonOptions(layout=BLS, platform=TENSORRT_PLAN))
    with pytest.raises(NucleusError, match=f"{PLUGIN_LIB} is missing"):
        plan_repository(built, TritonOptions(layout=INPROCESS, platform=TENSORRT_PLAN))


def test_generated_model_imports_the_repository_copy_of_the_runtime(bundle, tmp_path):
    repo = tmp_path / "repo"
    write_repository(plan_repository(bundle, TritonOptions(platform=ONNXRUNTIME)), repo)
    version = repo / "nucleus_pipeline" / "1"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('model', {str(version / 'model.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['model'] = module\n"
        "spec.loader.exec_module(module)\n"
        "import nucleus_runtime; print(nucleus_runtime.__file__)\n"
        "module.PipelineCore.load_bundle_files(module._HERE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).is_relative_to(version)


def test_onnx_external_data_travels_with_the_graph(tmp_path):
    options = ExportOptions(resolutions=[(128, 128)], max_text_len=16, opt_text_len=8, external_data=True)
    bundle = tmp_path / "ext"
    export_bundle(open_model("tiny"), bundle, options)
    repo = tmp_path / "repo"
    write_repository(plan_repository(bundle, TritonOptions(layout=BLS, platform=ONNXRUNTIME)), repo)
    import onnxruntime

    # fp32 graphs of an fp32 checkpoint: the weights live in the linked checkpoint shards, which travel along.
    shards = {p.name for p in (bundle / CHECKPOINT_LINKS_DIR).iterdir()}
    assert shards
    for graph in ("text_kv", "denoiser"):
        version = repo / f"nucleus_{graph}" / "1"
        assert {p.name for p in (version / CHECKPOINT_LINKS_DIR).iterdir()} <= shards
        onnxruntime.InferenceSession(str(version / "model.onnx"))  # loads only if its weights are found
    inprocess = tmp_path / "inprocess"
    write_repository(plan_repository(bundle, TritonOptions(layout=INPROCESS, platform=ONNXRUNTIME)), inprocess)
    version = inprocess / "nucleus_pipeline" / "1"
    assert {p.name for p in (version / CHECKPOINT_LINKS_DIR).iterdir()} == shards
    _open_backend(version, "onnxruntime", options=BackendOptions(device="cpu")).close()


# ---- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,message", [(BLS, "no TensorRT engine text_kv.plan"), (INPROCESS, "no file text_kv.plan")])
def test_tensorrt_plan_without_engines_is_refused(bundle, tmp_path, capsys, layout, message):
    with pytest.raises(NucleusExportError, match=message):
        plan_repository(bundle, TritonOptions(layout=layout, platform=TENSORRT_PLAN))
    assert main(["triton", "--bundle", str(bundle), "--repo", str(tmp_path / "repo"), "--layout", layout]) == 1
    err = capsys.readouterr().err
    assert "nucleus-export build --model" in err and "--platform onnxruntime" in err
    assert not (tmp_path / "repo").exists()


def test_tensorrt_rtx_engines_are_refused_for_tritons_tensorrt_backend_only(bundle, tmp_path):
    built = with_engines(bundle, tmp_path / "built", plugins=False, backend="tensorrt-rtx")
    with pytest.raises(NucleusExportError, match="TensorRT-RTX") as refused:
        plan_repository(built, TritonOptions(layout=BLS, platform=TENSORRT_PLAN))
    assert "--layout inprocess" in refused.value.fix
    plan_repository(built, TritonOptions(layout=BLS, platform=ONNXRUNTIME))  # the ONNX graphs still serve
    # In-process, the runtime's TensorRT backend loads the engines with tensorrt_rtx, the library that built them.
    plan = plan_repository(built, TritonOptions(layout=INPROCESS, platform=TENSORRT_PLAN))
    assert {"nucleus_pipeline/1/text_kv.plan", "nucleus_pipeline/1/denoiser.plan"} <= {f.relpath for f in plan.files}


def _refusals(bundle: Path, tmp_path: Path) -> list[NucleusExportError]:
    """Every refusal of the repository planner that a user can meet, each with its Fix."""
    rtx = with_engines(bundle, tmp_path / "rtx", plugins=False, backend="tensorrt-rtx")
    no_library = with_engines(bundle, tmp_path / "nolib", plugins=True)
    (no_library / PLUGIN_LIB).unlink()
    no_onnx = tmp_path / "noonnx"
    shutil.copytree(bundle, no_onnx)
    (no_onnx / "denoiser.onnx").unlink()
    cases = [
        (bundle, BLS, TENSORRT_PLAN),
        (bundle, INPROCESS, TENSORRT_PLAN),
        (rtx, BLS, TENSORRT_PLAN),
        (no_library, BLS, TENSORRT_PLAN),
        (no_library, INPROCESS, TENSORRT_PLAN),
        (no_onnx, BLS, ONNXRUNTIME),
        (no_onnx, INPROCESS, ONNXRUNTIME),
    ]
    errors = []
    for source, layout, platform in cases:
        with pytest.raises(NucleusExportError) as refused:
            plan_repository(source, TritonOptions(layout=layout, platform=platform, verify_checksums=False))
        errors.append(refused.value)
    return errors


def test_every_fix_names_commands_that_exist(bundle, tmp_path):
    parser = build_parser()
    placeholders = {"MODEL": "tiny", "BUNDLE": str(tmp_path / "out")}
    for error in _refusals(bundle, tmp_path):
        commands = re.findall(r"`(nucleus-export [^`]+)`", error.fix)
        flags = re.findall(r"(?<![\w`-])(--[a-z][a-z0-9-]*)(?: ([a-z][a-z_-]*))?", re.sub(r"`[^`]*`", "", error.fix))
        assert commands or flags, error.fix
        for command in commands:
            argv = [placeholders.get(word, word) for word in shlex.split(command)[1:]]
            parser.parse_args(argv)  # SystemExit (a failed test) on an unknown command, flag or choice
        for flag, value in flags:
            # A bare flag in a Fix is an option of `nucleus-export triton` (the command that raised it).
            argv = ["triton", "--bundle", "b", "--repo", "r", flag] + ([value] if value else [])
            parser.parse_args(argv)


def test_non_empty_repo_needs_force(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    args = ["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime"]
    assert main(args) == 0
    stale = repo / "nucleus_pipeline" / "stale.txt"
    stale.write_text("old")
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert stale.exists()
    assert main(args + ["--force", "--instances", "3"]) == 0
    assert not stale.exists()
    assert parse((repo / "nucleus_pipeline" / "config.pbtxt").read_text()).instance_group[0].count == 3


def test_force_never_deletes_a_folder_that_is_not_a_model_repository(bundle, tmp_path, capsys):
    repo = tmp_path / "home"
    repo.mkdir()
    (repo / "thesis.tex").write_text("precious")
    args = ["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime", "--force"]
    assert main(args) == 2
    assert "not Triton models" in capsys.readouterr().err
    assert (repo / "thesis.tex").read_text() == "precious"


def test_empty_existing_repo_is_used(bundle, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert main(["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime"]) == 0
    assert (repo / "nucleus_pipeline" / "config.pbtxt").is_file()


def test_dry_run_prints_tree_and_configs_and_writes_nothing(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    args = ["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime", "--layout", "bls", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nucleus_text_kv/1/model.onnx" in out and "nucleus_pipeline/1/model.py" in out
    for model in ("nucleus_text_kv", "nucleus_denoiser", "nucleus_pipeline"):
        section = out.split(f"--- {model}/config.pbtxt ---\n", 1)[1].split("\n--- ", 1)[0]
        assert parse(section).name == model
    assert not repo.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_old_repository(bundle, tmp_path):
    repo = tmp_path / "repo"
    plan = plan_repository(bundle, TritonOptions(platform=ONNXRUNTIME))
    write_repository(plan, repo)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    plan.files.append(RepoFile("nucleus_text_kv/1/extra.bin", source=tmp_path / "vanished.bin"))
    with pytest.raises(FileNotFoundError):
        write_repository(plan, repo, force=True)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "with space", "ünicode", "a\\b", "x" * 129])
def test_invalid_model_names(name):
    with pytest.raises(UsageError):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["nucleus_text_kv", "fp8_nucleus_denoiser", "Model-2.v1", "0model"])
def test_valid_model_names(name):
    assert validate_model_name(name) == name


def test_bad_prefix_on_the_command_line(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    args = ["triton", "--bundle", str(bundle), "--repo", str(repo), "--platform", "onnxruntime", "--name-prefix", "a/"]
    assert main(args) == 2
    assert "not a valid Triton model name" in capsys.readouterr().err
    assert not repo.exists()
    with pytest.raises(UsageError, match="must differ"):
        ModelNames("same", "same", "other").validate()


@pytest.mark.parametrize("flag,value", [("--instances", "0"), ("--max-queue-delay-us", "-1"), ("--onnxruntime-threads", "-1")])
def test_bad_numbers(bundle, tmp_path, flag, value):
    args = ["triton", "--bundle", str(bundle), "--repo", str(tmp_path / "r"), "--platform", "onnxruntime", flag, value]
    assert main(args) == 2
