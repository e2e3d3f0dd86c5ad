"""The nucleus_pipeline model: its request core on the tiny model against `nucleus-export run` (bit for bit), request
parsing and errors, and the generated model.py's Triton glue driven through a stand-in for the Python backend.

Triton does not run in this file (tests/test_triton_server.py starts a real server, which cannot run the bls layout's
graph models: its wheel has no ONNX Runtime backend). The stand-in (`StandInPbUtils`) implements the few
`triton_python_backend_utils` calls the model makes and answers BLS requests by running the generated repository's
ONNX models with ONNX Runtime; it checks the bls glue (tensor names, model names from the config, text K/V passed
through unchanged, errors as responses), not Triton's own behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.triton import model as pipeline_model
from nucleus_runtime.triton.model import OUTPUT_LATENTS, PipelineCore
from safetensors.numpy import load_file, save_file

from nucleus_export.cli import main
from nucleus_export.export import ExportOptions, export_bundle
from nucleus_export.model.specs import open_model
from nucleus_export.triton import schema
from nucleus_export.triton.configs import BLS, ONNXRUNTIME
from nucleus_export.triton.repository import (
    TritonOptions,
    plan_repository,
    write_repository,
)

HEIGHT, WIDTH, STEPS, GUIDANCE, SEED = 128, 256, 3, 4.0, 7


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline") / "bundle"
    options = ExportOptions(resolutions=[(128, 128), (128, 256)], max_text_len=32, opt_text_len=16)
    export_bundle(open_model("tiny"), root, options)
    return root


@pytest.fixture(scope="module")
def texts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    mask = np.ones((1, 9), np.int64)
    mask[:, 7:] = 0  # two padding tokens, as a tokenizer pads
    return {
        "prompt_embeds": rng.standard_normal((1, 9, 64)).astype(np.float32),
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": rng.standard_normal((1, 4, 64)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def core(bundle) -> PipelineCore:
    manifest, scheduler = PipelineCore.load_bundle_files(bundle)
    return PipelineCore(OrtBackend(bundle, OrtOptions(device="cpu"), manifest=manifest), manifest, scheduler)


def run_cli(bundle: Path, tmp: Path, texts: dict[str, np.ndarray], *extra: str) -> np.ndarray:
    save_file({"prompt_embeds": texts["prompt_embeds"], "prompt_embeds_mask": texts["prompt_embeds_mask"]}, tmp / "p.safetensors")
    save_file({"prompt_embeds": texts["negative_prompt_embeds"]}, tmp / "n.safetensors")
    out = tmp / "out.safetensors"
    args = ["run", "--bundle", str(bundle), "--prompt-embeds", str(tmp / "p.safetensors"), "--negative-prompt-embeds",
            str(tmp / "n.safetensors"), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS),
            "--out", str(out), "--device", "cpu", *extra]  # fmt: skip
    assert main(args) == 0
    return load_file(str(out))["latents"]


def scalars(**values: Any) -> dict[str, np.ndarray]:
    """Scalars as a Triton client sends them: [1] tensors of the config's types."""
    dtypes = {s.name: s.dtype for s in pipeline_model.PIPELINE_INPUTS}
    return {k: np.array([v], dtype=dtypes[k]) for k, v in values.items()}


def test_core_matches_nucleus_export_run_bit_for_bit(core, bundle, texts, tmp_path):
    reference = run_cli(bundle, tmp_path, texts, "--guidance", str(GUIDANCE), "--seed", str(SEED))
    request = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)}
    out = core(request)[OUTPUT_LATENTS]
    assert out.dtype == np.float32 and out.shape == reference.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 64)
    assert np.array_equal(out, reference)


def test_core_with_initial_latents_and_parameters_matches_run(core, bundle, texts, tmp_path):
    latents = np.random.default_rng(3).standard_normal((1, 128, 64)).astype(np.float32)
    save_file({"latents": latents}, tmp_path / "l.safetensors")
    # guidance 1: no CFG, the negative prompt is ignored by both.
    reference = run_cli(bundle, tmp_path, texts, "--guidance", "1.0", "--latents", str(tmp_path / "l.safetensors"))
    request = {"prompt_embeds": texts["prompt_embeds"], "prompt_embeds_mask": texts["prompt_embeds_mask"], "initial_latents": latents}
    params = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": STEPS, "guidance_scale": 1.0}
    assert np.array_equal(core(request, params)[OUTPUT_LATENTS], reference)


def test_text_kv_is_cached_across_steps_and_requests(core, texts):
    core = PipelineCore(core.backend, core.manifest, core.scheduler_config)  # a fresh cache
    request = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=1)}
    first = core(request)[OUTPUT_LATENTS]
    after_first = core.cache.stats
    assert (after_first.misses, after_first.hits) == (1, 0)  # one text K/V for all steps of the request
    second = core(request)[OUTPUT_LATENTS]
    assert core.cache.stats.hits == after_first.hits + 1 and core.cache.stats.misses == after_first.misses
    assert np.array_equal(first, second)
    other_grid = core({**request, **scalars(height=128, width=128)})[OUTPUT_LATENTS]
    assert core.cache.stats.misses == after_first.misses + 1  # another grid, other text RoPE: not a hit
    assert other_grid.shape == (1, 64, 64)


def test_zero_cache_bound_keeps_nothing_across_requests(core, texts):
    core = PipelineCore(core.backend, core.manifest, core.scheduler_config, cache_bytes=0)
    request = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=1)}
    core(request)
    core(request)
    assert core.cache.stats.misses == 2 and core.cache.stats.entries == 0


def test_tensor_inputs_win_over_parameters(core, texts):
    request = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=2, seed=5)}
    a = core(request, {"seed": 6, "num_inference_steps": 9})[OUTPUT_LATENTS]
    b = core(request)[OUTPUT_LATENTS]
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"prompt_embeds": None}, "no prompt_embeds"),
        ({"prompt": np.zeros(1)}, "unknown inputs"),
        ({"seed": np.array([-1])}, "seed"),
        ({"num_inference_steps": np.array([0])}, "num_inference_steps"),
        ({"height": np.array([100])}, "not in this bundle's profiles"),
        ({"guidance_scale": np.array([np.nan], np.float32)}, "guidance_scale"),
        ({"prompt_embeds": np.full((1, 9, 64), np.nan, np.float32)}, "prompt_embeds holds NaN"),
        ({"negative_prompt_embeds": np.full((1, 4, 64), np.inf, np.float32)}, "negative_prompt_embeds holds NaN or inf"),
        ({"negative_prompt_embeds": None}, "negative prompt"),
        ({"prompt_embeds": np.zeros((1, 40, 64), np.float32), "prompt_embeds_mask": None}, "outside the bundle's profile"),
        ({"seed": np.array([1, 2])}, "takes one"),
    ],
)
def test_bad_requests_raise_clear_errors(core, texts, change, message):
    request = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=1)}
    request.update(change)
    request = {k: v for k, v in request.items() if v is not None}
    with pytest.raises(NucleusError, match=message):
        core(request)


# ---- the generated model.py through a stand-in for Triton's Python backend -------------------------------------


class StandInPbUtils:
    """The triton_python_backend_utils calls model.py makes; BLS answered by ONNX Runtime on the repository's models."""

    TRITONSERVER_MEMORY_CPU = 1
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self, repo: Path):
        self.repo = repo
        self.sessions: dict[str, Any] = {}
        self.calls: list[tuple[str, tuple[str, ...], bool]] = []
        pb = self

        class Tensor:
            def __init__(self, name: str, array: np.ndarray):
                self._name, self._array = name, array

            def name(self) -> str:
                return self._name

            def as_numpy(self) -> np.ndarray:
                return self._array

            @classmethod
            def from_dlpack(cls, name: str, owner: Any) -> Tensor:
                return cls(name, np.from_dlpack(owner))

            def __dlpack__(self, **kwargs: Any) -> Any:
                return self._array.__dlpack__(**kwargs)

            def __dlpack_device__(self) -> tuple[int, int]:
                return self._array.__dlpack_device__()

            def is_cpu(self) -> bool:
                return True

        class TritonError:
            def __init__(self, message: str):
                self._message = message

            def message(self) -> str:
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None):
                self._outputs, self._error = output_tensors, error

            def has_error(self) -> bool:
                return self._error is not None

            def error(self) -> TritonError | None:
                return self._error

            def output_tensors(self) -> list[Tensor]:
                return self._outputs

        class InferenceRequest:
            def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[Tensor], preferred_memory: Any = None):
                self.model_name, self.outputs, self.inputs, self.preferred = model_name, requested_output_names, inputs, preferred_memory

            def exec(self) -> InferenceResponse:
                pb.calls.append((self.model_name, tuple(t.name() for t in self.inputs), self.preferred is not None))
                path = pb.repo / self.model_name / "1" / "model.onnx"
                if not path.is_file():
                    return InferenceResponse([], TritonError(f"Request for unknown model: '{self.model_name}' is not found"))
                session = pb.sessions.setdefault(self.model_name, onnxruntime.InferenceSession(str(path)))
                results = session.run(self.outputs, {t.name(): t.as_numpy() for t in self.inputs})
                return InferenceResponse([Tensor(n, r) for n, r in zip(self.outputs, results)])

        self.Tensor, self.TritonError, self.InferenceResponse, self.InferenceRequest = Tensor, TritonError, InferenceResponse, InferenceRequest

    def PreferredMemory(self, kind: int, device: int) -> tuple[int, int]:  # noqa: N802 - pb_utils' name
        return (kind, device)

    class MetricFamily:
        """Custom metrics: each metric keeps its value, by (family name, labels)."""

        COUNTER, GAUGE = "counter", "gauge"
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

        def __init__(self, name: str, description: str, kind: str):
            self.name = name

        def Metric(self, labels: dict[str, str]) -> Any:  # noqa: N802 - pb_utils' name
            values, key = self.values, (self.name, tuple(sorted(labels.items())))
            values[key] = 0.0

            class Metric:
                def increment(self, value: float) -> None:
                    values[key] += value

                def set(self, value: float) -> None:
                    values[key] = value

            return Metric()

    class Logger:
        messages: list[str] = []

        @classmethod
        def log_verbose(cls, message: str) -> None:
            cls.messages.append(message)

    @staticmethod
    def get_input_tensor_by_name(request: Any, name: str) -> Any:
        return next((t for t in request.inputs if t.name() == name), None)

    @staticmethod
    def get_output_tensor_by_name(response: Any, name: str) -> Any:
        return next((t for t in response.output_tensors() if t.name() == name), None)


class ClientRequest:
    """An incoming request as the Python backend hands it to execute(), and its response sender, which keeps what
    the model sends (from the batcher's worker thread) until the final flag."""

    def __init__(self, pb: StandInPbUtils, tensors: dict[str, np.ndarray], parameters: dict[str, Any] | None = None):
        self.inputs = [pb.Tensor(k, v) for k, v in tensors.items()]
        self._parameters = json.dumps(parameters or {})
        self.responses: list[Any] = []
        self._final = threading.Event()

    def parameters(self) -> str:
        return self._parameters

    def timeout(self) -> int:
        return 0

    def requested_output_names(self) -> list[str]:
        return []

    def get_response_sender(self) -> ClientRequest:
        return self

    def is_cancelled(self) -> bool:
        return False

    def send(self, response: Any = None, flags: int = 0) -> None:
        if response is not None:
            self.responses.append(response)
        if flags & StandInPbUtils.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self._final.set()

    def final_response(self, timeout: float = 120) -> Any:
        assert self._final.wait(timeout), "no final response"
        return self.responses[-1]


def load_generated_model(repo: Path, pb: StandInPbUtils, monkeypatch, model_name: str = "nucleus_pipeline") -> Any:
    from google.protobuf.json_format import MessageToDict

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.setattr(sys, "path", list(sys.path))  # model.py prepends its folder; undone after the test
    path = repo / model_name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("generated_pipeline_model", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    config = schema.parse_model_config((repo / model_name / "config.pbtxt").read_text())
    model = module.TritonPythonModel()
    # Triton hands initialize() the config as JSON with the proto's field names.
    model.initialize({"model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)), "model_name": model_name})
    return model


@pytest.mark.skipif(not schema.available(), reason="tritonclient is not installed")
def test_generated_model_py_serves_requests_through_bls(core, bundle, texts, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_repository(plan_repository(bundle, TritonOptions(layout=BLS, platform=ONNXRUNTIME, name_prefix="t_")), repo)
    pb = StandInPbUtils(repo)
    model = load_generated_model(repo, pb, monkeypatch, "t_nucleus_pipeline")

    good = {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)}
    bad = {k: v for k, v in good.items() if k != "prompt_embeds"}
    requests = [ClientRequest(pb, good), ClientRequest(pb, bad)]
    assert model.execute(requests) is None  # the batcher's worker thread sends the responses
    responses = [r.final_response() for r in requests]

    assert not responses[0].has_error()
    latents = pb.get_output_tensor_by_name(responses[0], OUTPUT_LATENTS).as_numpy()
    expected = core(good)[OUTPUT_LATENTS]
    # Same graphs, same loop, ONNX Runtime on the same machine with the same thread count: identical bits.
    assert np.array_equal(latents, expected)
    assert responses[1].has_error() and "prompt_embeds" in responses[1].error().message()

    text_kv_calls = [c for c in pb.calls if c[0] == "t_nucleus_text_kv"]
    denoiser_calls = [c for c in pb.calls if c[0] == "t_nucleus_denoiser"]
    assert len(text_kv_calls) == 1  # once per request, not per step
    assert len(denoiser_calls) == STEPS  # CFG as one batch of 2: one call per step
    assert all(preferred for _, _, preferred in denoiser_calls)  # sample asked for in host memory
    assert set(denoiser_calls[0][1]) == {"hidden_states", "timestep", "img_rope_cos", "img_rope_sin", "text_kv", "encoder_hidden_states_mask"}

    # The same prompt again: text K/V comes from the instance's cache, no second text_kv call.
    again = ClientRequest(pb, good)
    model.execute([again])
    assert np.array_equal(pb.get_output_tensor_by_name(again.final_response(), OUTPUT_LATENTS).as_numpy(), latents)
    assert len([c for c in pb.calls if c[0] == "t_nucleus_text_kv"]) == 1
    hits = [v for (name, labels), v in pb.MetricFamily.values.items()
            if name == pipeline_model.METRIC_TEXT_KV_CACHE and ("event", "hits") in labels]  # fmt: skip
    assert hits == [1.0]

    # A refusal reaches no worker round, so while the worker is idle the refusal itself publishes the metrics.
    def invalid() -> float:
        return sum(v for (name, labels), v in pb.MetricFamily.values.items()
                   if name == pipeline_model.METRIC_REQUESTS and ("outcome", "invalid") in labels)  # fmt: skip

    refused_before = invalid()
    late = ClientRequest(pb, bad)
    model.execute([late])
    assert late.final_response().has_error()
    assert invalid() == refused_before + 1
    model.finalize()


@pytest.mark.skipif(not schema.available(), reason="tritonclient is not installed")
def test_failed_bls_call_becomes_an_error_response(bundle, texts, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    write_repository(plan_repository(bundle, TritonOptions(layout=BLS, platform=ONNXRUNTIME)), repo)
    pb = StandInPbUtils(repo)
    model = load_generated_model(repo, pb, monkeypatch)
    model.core.backend.denoiser_model = "missing_denoiser"
    request = ClientRequest(pb, {**texts, **scalars(height=HEIGHT, width=WIDTH, num_inference_steps=1)})
    model.execute([request])
    response = request.final_response()
    model.finalize()
    assert response.has_error()
    assert "Triton model missing_denoiser failed" in response.error().message()
