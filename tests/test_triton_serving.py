"""A real tritonserver under load and faults, with text in and a progress stream (the step batcher behind Triton).

- text in: the generated README's string request over HTTP returns the PNG that `nucleus-export run --prompt`
  writes, bit for bit, and the pixels in `image`;
- progress: a `--stream-progress` (decoupled) repository streams one progress response per step over gRPC, then the
  result; a request cancelled from the client (stop_stream) leaves the batch at the next step;
- faults, each ending in one clear error for the request at fault and nothing lost for the others: a malformed
  request and requests outside the bundle's profiles (resolution, batch, text length) among good ones in flight; a
  client killed mid-request (its rows are freed: the model sees the gRPC cancellation); a request past its deadline;
  the server killed with SIGKILL and restarted on the same repository (READY again, nothing left behind in the
  repository, the next request correct);
- the model's custom metrics on Triton's metrics endpoint: requests by outcome, batching, and the text K/V cache
  filled past its bound (evictions counted, bytes within the bound).

Every server runs ONNX Runtime with one thread, and references come from `nucleus-export run` or from `generate`
(what `run` calls) with one thread: the latents must be equal bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.bundle import load_manifest
from nucleus_runtime.pipeline import generate
from nucleus_runtime.triton import model as pipeline_model
from test_triton_server import PIPELINE, THREADS, infer, run_client_code, texts

from nucleus_export.cli import main
from nucleus_export.triton import serving
from nucleus_export.triton.configs import INPROCESS, ONNXRUNTIME
from nucleus_export.triton.local_server import Server, read_metrics, running_server
from nucleus_export.triton.repository import TritonOptions, plan_repository, write_repository

try:
    import tritonclient.grpc as tritonclient_grpc
    from tritonclient.utils import InferenceServerException
except ImportError:  # reported by the triton_install fixture, which every test here uses
    tritonclient_grpc = None
    InferenceServerException = Exception

STEPS = 3
PROMPT = "a red fox in fresh snow"


def repository(bundle: Path, repo: Path, **options) -> Path:
    write_repository(plan_repository(bundle, TritonOptions(layout=INPROCESS, platform=ONNXRUNTIME, onnxruntime_threads=THREADS, **options)), repo)
    return repo


def metric(server: Server, name: str, **labels: str) -> float:
    """The sum of a model metric over its instances, for the given labels."""
    values = read_metrics(server.metrics_url).get(name, {})
    return sum(v for key, v in values.items() if set(labels.items()) <= set(key))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.05)


def request(seed: int, prompt_len: int, negative_len: int, height: int, width: int, guidance: float = 4.0,
            steps: int = STEPS) -> dict[str, np.ndarray]:  # fmt: skip
    prompt, negative = texts(seed, prompt_len, negative_len)
    return {"prompt_embeds": prompt, "negative_prompt_embeds": negative, "height": np.array([height], np.int64),
            "width": np.array([width], np.int64), "num_inference_steps": np.array([steps], np.int64),
            "guidance_scale": np.array([guidance], np.float32), "seed": np.array([seed], np.int64)}  # fmt: skip


@pytest.fixture(scope="module")
def reference(serving_bundle) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """`generate` (what `nucleus-export run` runs) on one request, alone, one ONNX Runtime thread."""
    backend = OrtBackend(serving_bundle, OrtOptions(threads=THREADS, device="cpu"))
    manifest, scheduler = pipeline_model.PipelineCore.load_bundle_files(serving_bundle)

    def latents(inputs: dict[str, np.ndarray]) -> np.ndarray:
        return generate(backend, manifest, scheduler, inputs["prompt_embeds"], None, inputs["negative_prompt_embeds"],
                        height=int(inputs["height"][0]), width=int(inputs["width"][0]),
                        steps=int(inputs["num_inference_steps"][0]), guidance=float(inputs["guidance_scale"][0]),
                        seed=int(inputs["seed"][0]))  # fmt: skip

    return latents


# ---- text in ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_server(triton_install, toy_bundle, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("text_server")
    with running_server(triton_install, repository(toy_bundle, root / "repo"), root / "server.log") as server:
        yield server


def test_a_string_request_gets_the_png_of_nucleus_export_run(text_server, toy_bundle, tmp_path):
    expected = tmp_path / "run.png"
    assert main(["run", "--bundle", str(toy_bundle), "--prompt", PROMPT, "--height", "64", "--width", "128",
                 "--steps", str(STEPS), "--seed", "5", "--backend", "onnxruntime", "--threads", str(THREADS),
                 "--out", str(expected)]) == 0  # fmt: skip
    code = serving.client_code(PIPELINE, text_server.url("http"), "http", prompt=PROMPT, height=64, width=128,
                               steps=STEPS, seed=5, png_path="served.png")  # fmt: skip
    client = run_client_code(tmp_path / "client", code)
    assert (tmp_path / "client" / "served.png").read_bytes() == expected.read_bytes()
    image = client["image"]
    assert image.dtype == np.uint8 and image.shape == (1, 64, 128, 3)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(expected).convert("RGB")), image[0])
    readme = (text_server.log_path.parent / "repo" / "README.md").read_text()
    assert '("prompt", np.array([' in readme and "first `python3` on the server's PATH and ignores PYTHONPATH" in readme


# ---- the progress stream ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_server(triton_install, toy_bundle, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("stream_server")
    repo = repository(toy_bundle, root / "repo", stream_progress=True)
    with running_server(triton_install, repo, root / "server.log", metrics=True) as server:
        yield server


def test_the_progress_stream_reports_every_step_then_the_result(stream_server, text_server, tmp_path):
    code = serving.client_code(PIPELINE, stream_server.url("grpc"), "grpc", prompt=PROMPT, stream=True, height=64,
                               width=128, steps=STEPS, seed=5)  # fmt: skip
    client = run_client_code(tmp_path, code)
    progress = client["progress"]
    assert [(int(s), int(t)) for s, t, _ in progress] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(a[2] <= b[2] for a, b in zip(progress, progress[1:]))
    # The same pixels as the default-mode server's.
    plain = run_client_code(tmp_path / "plain", serving.client_code(
        PIPELINE, text_server.url("http"), "http", prompt=PROMPT, height=64, width=128, steps=STEPS, seed=5))
    assert np.array_equal(client["image"], plain["image"])


def test_a_request_cancelled_by_its_client_leaves_the_batch(stream_server):
    responses: queue.Queue = queue.Queue()
    client = tritonclient_grpc.InferenceServerClient(stream_server.url("grpc"))
    inputs = []
    for name, value in {"prompt": np.array([b"a long one"], np.object_), "num_inference_steps": np.array([100_000]),
                        "height": np.array([64]), "width": np.array([64])}.items():  # fmt: skip
        tensor = tritonclient_grpc.InferInput(name, list(value.shape), serving.CLIENT_TYPES[value.dtype.name])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.start_stream(callback=lambda result, error: responses.put(error or result))
    client.async_stream_infer(PIPELINE, inputs)
    for _ in range(2):  # it is running: two steps done
        assert not isinstance(responses.get(timeout=60), Exception)
    cancelled = metric(stream_server, pipeline_model.METRIC_REQUESTS, outcome="cancelled")
    client.stop_stream(cancel_requests=True)
    client.close()
    wait_for(lambda: metric(stream_server, pipeline_model.METRIC_REQUESTS, outcome="cancelled") == cancelled + 1,
             "the model ends the cancelled request")
    assert metric(stream_server, pipeline_model.METRIC_ACTIVE) == 0


# ---- faults, under load -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(triton_install, serving_bundle, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fault_server")
    # A text K/V cache of about three requests' worth: the load below fills it past its bound.
    per_token = serving.text_kv_bytes_per_token(load_manifest(serving_bundle))
    repo = repository(serving_bundle, root / "repo", text_kv_cache_bytes=3 * 10 * per_token)
    with running_server(triton_install, repo, root / "server.log", metrics=True, log_verbose="1") as server:
        yield server


BAD_REQUESTS = {
    "nan": ({"prompt_embeds": np.full((1, 6, 64), np.nan, np.float32)}, "prompt_embeds holds NaN"),
    "resolution": ({"width": np.array([200], np.int64)}, "resolution 128x200 is not in this bundle's profiles"),
    "batch": ({"prompt_embeds": np.zeros((5, 6, 64), np.float32), "negative_prompt_embeds": np.zeros((5, 2, 64), np.float32)},
              "needs batch 10 .* serves batch 1..8"),
    "text-length": ({"prompt_embeds": np.zeros((1, 65, 64), np.float32)}, "text length 65 is outside"),
    "dtype": ({"seed": np.array([1.5], np.float32)}, "seed"),  # Triton itself refuses the wrong element type
}


def test_bad_requests_among_good_ones_fail_alone(fault_server, reference):
    good = [request(1, 9, 4, 128, 128), request(2, 30, 30, 96, 160, 3.0), request(3, 1, 8, 128, 128, 5.5, steps=6),
            request(4, 12, 12, 128, 128, 1.0)]  # fmt: skip
    bad = {name: {**request(9, 6, 2, 128, 128), **change} for name, (change, _) in BAD_REQUESTS.items()}
    before = read_metrics(fault_server.metrics_url)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(good) + len(bad)) as pool:
        served = [pool.submit(infer, fault_server.url(p), p, inputs) for p, inputs in zip(["http", "grpc"] * 2, good)]
        failed = {name: pool.submit(infer, fault_server.url("grpc"), "grpc", inputs) for name, inputs in bad.items()}
        for name, future in failed.items():
            with pytest.raises(InferenceServerException, match=BAD_REQUESTS[name][1]):
                future.result()
        for future, inputs in zip(served, good):
            assert np.array_equal(future.result(), reference(inputs))

    def delta(name: str, **labels: str) -> float:
        return metric(fault_server, name, **labels) - sum(
            v for k, v in before.get(name, {}).items() if set(labels.items()) <= set(k))

    # The model publishes its metrics when it goes idle (and every quarter second while busy), refusals also when
    # they arrive while it is idle. The dtype one never reached the model.
    wait_for(lambda: delta(pipeline_model.METRIC_REQUESTS, outcome="completed") == len(good)
             and delta(pipeline_model.METRIC_REQUESTS, outcome="invalid") >= len(bad) - 1, "the metrics settle")
    assert delta(pipeline_model.METRIC_REQUESTS, outcome="invalid") == len(bad) - 1
    rows = [(2 if g["guidance_scale"][0] > 1 else 1) * int(g["num_inference_steps"][0]) for g in good]
    assert delta(pipeline_model.METRIC_DENOISER_ROWS) == sum(rows)
    assert delta(pipeline_model.METRIC_STAGE_SECONDS, stage="denoise") > 0


def test_the_text_kv_cache_is_filled_past_its_bound(fault_server, serving_bundle):
    for seed in range(100, 106):  # six different prompts, one after the other: six entries of ten tokens
        infer(fault_server.url("grpc"), "grpc", request(seed, 10, 10, 96, 160, steps=1))
    bound = int((fault_server.log_path.parent / "repo" / PIPELINE / "config.pbtxt").read_text()
                .split(f'key: "{pipeline_model.PARAM_TEXT_KV_CACHE_BYTES}"')[1].split('"')[1])  # fmt: skip
    wait_for(lambda: metric(fault_server, pipeline_model.METRIC_TEXT_KV_CACHE, event="evictions") >= 3,
             "six entries of about a third of the bound each evict at least three")
    assert 0 < metric(fault_server, pipeline_model.METRIC_TEXT_KV_CACHE_BYTES) <= bound
    assert metric(fault_server, pipeline_model.METRIC_TEXT_KV_CACHE_ENTRIES) <= 3


def test_a_request_past_its_deadline_gets_an_error_and_the_rest_is_served(fault_server, reference):
    good = request(7, 5, 5, 128, 128)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        slow = pool.submit(infer, fault_server.url("grpc"), "grpc", request(8, 5, 5, 128, 128, steps=100_000),
                           timeout=500_000)  # the request's own timeout: 0.5 s, in microseconds
        fine = pool.submit(infer, fault_server.url("http"), "http", good)
        with pytest.raises(InferenceServerException, match=r"deadline of 0.5 s passed after \d+ of 100000 steps"):
            slow.result()
        assert np.array_equal(fine.result(), reference(good))


KILLED_CLIENT = """
import numpy as np, sys, tritonclient.grpc as g
client = g.InferenceServerClient(sys.argv[1])
inputs = []
for name, value in [("prompt_embeds", np.zeros((1, 4, 64), np.float32)), ("num_inference_steps", np.array([100000]))]:
    t = g.InferInput(name, list(value.shape), {"float32": "FP32", "int64": "INT64"}[value.dtype.name])
    t.set_data_from_numpy(value)
    inputs.append(t)
client.infer("nucleus_pipeline", inputs, parameters={"guidance_scale": 1.0})
"""


def test_a_killed_client_frees_its_rows(fault_server, reference):
    cancelled = metric(fault_server, pipeline_model.METRIC_REQUESTS, outcome="cancelled")
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, fault_server.url("grpc")])
    try:
        wait_for(lambda: metric(fault_server, pipeline_model.METRIC_ACTIVE) == 1, "the client's request runs")
    finally:
        client.kill()
        client.wait()
    wait_for(lambda: metric(fault_server, pipeline_model.METRIC_REQUESTS, outcome="cancelled") == cancelled + 1,
             "the model ends the request of the killed client")
    assert metric(fault_server, pipeline_model.METRIC_ACTIVE) == 0
    good = request(11, 7, 3, 96, 160)
    assert np.array_equal(infer(fault_server.url("http"), "http", good), reference(good))


def _living(group: int) -> list[str]:
    """The processes of a process group that are not zombies (a killed server's stubs are reaped by init)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(stat.parent.name)
    return found


def _shm_regions(group: int) -> list[str]:
    """The shared memory regions the Python backend stubs of a server use (the stub's command line names its own)."""
    regions = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            same_group = os.getpgid(int(cmdline.parent.name)) == group
        except (OSError, ProcessLookupError):
            continue
        if same_group and args and args[0].endswith(b"triton_python_backend_stub"):
            regions.update(a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region"))
    return sorted(regions)


def _tree(repo: Path) -> dict[str, str]:
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(repo.rglob("*")) if p.is_file()}


def test_a_server_killed_with_sigkill_restarts_on_the_same_repository(triton_install, serving_bundle, tmp_path, reference):
    repo = repository(serving_bundle, tmp_path / "repo")
    generated = _tree(repo)
    good = request(12, 9, 4, 128, 128)
    with running_server(triton_install, repo, tmp_path / "first.log") as server:
        assert np.array_equal(infer(server.url("grpc"), "grpc", good), reference(good))
        loaded = _tree(repo)
        regions = _shm_regions(server.process.pid)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            in_flight = pool.submit(infer, server.url("grpc"), "grpc", request(13, 4, 4, 128, 128, steps=100_000))
            time.sleep(1.0)
            server.kill()
            with pytest.raises(InferenceServerException):
                in_flight.result(timeout=60)
        assert not _living(server.process.pid)  # the stubs went with the server (its process group)
    # What a SIGKILL does leave behind is outside the repository: the Python backend's shared memory region in
    # /dev/shm, which no later server reuses (docs/triton.md). Remove this server's.
    assert regions and all(Path("/dev/shm", r).exists() for r in regions)
    for region in regions:
        Path("/dev/shm", region).unlink()
    # Nothing the crash could leave behind: the repository is file for file as the server had loaded it, and that
    # is the generated repository plus, at most, the bytecode Python caches for the stub-imported model.py itself.
    assert _tree(repo) == loaded
    assert all(name.endswith(".pyc") and "/1/__pycache__/model." in f"/{name}" for name in set(loaded) - set(generated))
    with running_server(triton_install, repo, tmp_path / "second.log") as server:
        assert np.array_equal(infer(server.url("http"), "http", good), reference(good))
    assert _tree(repo) == loaded
