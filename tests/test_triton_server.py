"""A real Triton Inference Server on generated repositories.

The `nvidia-pytriton` wheel (in the `dev` and `triton` extras) ships a real `tritonserver` (2.51), its Python backend
and per-Python stubs. `nucleus_export.triton.local_server` assembles a backend folder from them and starts the server
on free loopback ports with the command `nucleus_export.triton.serving.server_command` builds (the one the
repository's README shows); the tests talk to it with tritonclient over HTTP and gRPC by running the README's client
code (`serving.client_code`). Load, faults, progress and text in: tests/test_triton_serving.py.

- inprocess on ONNX Runtime (CPU): latents equal `nucleus-export run` bit for bit, over HTTP and gRPC; four
  concurrent requests with different prompts, sizes and guidance are all correct; bad requests get Triton error
  responses and the server keeps serving.
- every layout's configs pass the server's own validation (auto-complete off): inprocess loads READY; in bls the
  pipeline loads READY and the graph models fail only for want of Triton's ONNX Runtime backend, which the wheel
  does not ship (so their configs were accepted as complete).

Determinism: both sides run ONNX Runtime with one intra-op thread (`--onnxruntime-threads 1` for the repository,
`--threads 1` for `run`), so the bit-for-bit comparison does not rest on two processes splitting reductions across
their thread pools the same way, and two server instances do not oversubscribe a 2-core CI machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from nucleus_export.cli import main
from nucleus_export.triton import serving
from nucleus_export.triton.configs import BLS, INPROCESS, ONNXRUNTIME
from nucleus_export.triton.local_server import LocalTriton, Server, running_server
from nucleus_export.triton.repository import (
    TritonOptions,
    plan_repository,
    write_repository,
)

PIPELINE = "nucleus_pipeline"
THREADS = 1
STEPS = 3
JOINT_DIM = 64  # the tiny model's text width

try:
    import tritonclient.grpc as tritonclient_grpc
    import tritonclient.http as tritonclient_http
    from tritonclient.utils import InferenceServerException
except ImportError:  # reported by the triton_install fixture, which every test here uses
    tritonclient_grpc = tritonclient_http = None
    InferenceServerException = Exception


# ---- requests and references -----------------------------------------------------------------------------------------


def texts(seed: int, prompt_len: int, negative_len: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((1, prompt_len, JOINT_DIM)).astype(np.float32),
        rng.standard_normal((1, negative_len, JOINT_DIM)).astype(np.float32),
    )


def reference(bundle: Path, folder: Path, prompt: np.ndarray, negative: np.ndarray, height: int, width: int, guidance: float, seed: int) -> np.ndarray:
    """`nucleus-export run` on the same inputs (ONNX Runtime on the CPU, one thread, like the served repository)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeds": prompt}, folder / "p.safetensors")
    save_file({"prompt_embeds": negative}, folder / "n.safetensors")
    out = folder / "out.safetensors"
    args = ["run", "--bundle", str(bundle), "--prompt-embeds", str(folder / "p.safetensors"), "--negative-prompt-embeds",
            str(folder / "n.safetensors"), "--height", str(height), "--width", str(width), "--steps", str(STEPS),
            "--guidance", str(guidance), "--seed", str(seed), "--out", str(out), "--device", "cpu",
            "--threads", str(THREADS)]  # fmt: skip
    assert main(args) == 0
    return load_file(str(out))["latents"]


def readme_client(folder: Path, url: str, protocol: str, prompt: np.ndarray, negative: np.ndarray, **request) -> np.ndarray:
    """Run the README's client code in `folder` (it reads prompt_embeds.npy and negative_embeds.npy there)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "prompt_embeds.npy", prompt)
    np.save(folder / "negative_embeds.npy", negative)
    return run_client_code(folder, serving.client_code(PIPELINE, url, protocol, steps=STEPS, **request))["latents"]


def run_client_code(folder: Path, code: str) -> dict:
    """Execute client code (`serving.client_code`, as the README shows it) in `folder`; its variables."""
    folder.mkdir(parents=True, exist_ok=True)
    namespace: dict = {}
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        exec(compile(code, "<README client code>", "exec"), namespace)
    finally:
        os.chdir(cwd)
        if "client" in namespace:
            namespace["client"].close()
    return namespace


def infer(url: str, protocol: str, inputs: dict[str, np.ndarray], output: str = "latents", **options) -> np.ndarray:
    """One request with tritonclient, `options` passed to its infer (e.g. timeout); thread-safe (a client per call)."""
    module = tritonclient_http if protocol == "http" else tritonclient_grpc
    tensors = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), serving.CLIENT_TYPES[value.dtype.name])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    with contextlib.closing(module.InferenceServerClient(url)) as client:
        return client.infer(PIPELINE, tensors, **options).as_numpy(output)


def request_inputs(prompt: np.ndarray, negative: np.ndarray | None, height: int, width: int, guidance: float, seed: int) -> dict[str, np.ndarray]:
    inputs = {"prompt_embeds": prompt}
    if negative is not None:
        inputs["negative_prompt_embeds"] = negative
    inputs.update(
        height=np.array([height], np.int64),
        width=np.array([width], np.int64),
        num_inference_steps=np.array([STEPS], np.int64),
        guidance_scale=np.array([guidance], np.float32),
        seed=np.array([seed], np.int64),
    )
    return inputs


# ---- inprocess on ONNX Runtime -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inprocess_server(triton_install, tiny_bundle, tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("triton_server")
    repo = root / "repo"
    options = TritonOptions(layout=INPROCESS, platform=ONNXRUNTIME, instances=2, onnxruntime_threads=THREADS)
    write_repository(plan_repository(tiny_bundle, options), repo)
    with running_server(triton_install, repo, root / "server.log", log_verbose="1") as server:
        print(f"\ntritonserver ready in {server.start_seconds:.2f} s")
        yield server


@pytest.mark.parametrize("protocol", serving.PROTOCOLS)
def test_readme_client_gets_the_latents_of_nucleus_export_run(inprocess_server, tiny_bundle, tmp_path, protocol):
    prompt, negative = texts(1, 9, 4)
    expected = reference(tiny_bundle, tmp_path / "ref", prompt, negative, 96, 160, 4.0, 7)
    start = time.perf_counter()
    latents = readme_client(tmp_path / "client", inprocess_server.url(protocol), protocol, prompt, negative,
                            height=96, width=160, guidance=4.0, seed=7)  # fmt: skip
    print(f"\n{protocol}: one request ({STEPS} steps, 96x160, CFG) in {time.perf_counter() - start:.3f} s")
    assert latents.dtype == np.float32 and latents.shape == expected.shape == (1, 6 * 10, 64)
    assert np.array_equal(latents, expected)


def test_four_concurrent_requests_are_all_correct(inprocess_server, tiny_bundle, tmp_path):
    # Different prompt lengths, sizes, guidance (with and without CFG), seeds and protocols, all in flight at once.
    cases = [
        ("http", texts(11, 5, 3), 128, 128, 4.0, 0),
        ("grpc", texts(12, 17, 2), 96, 160, 3.0, 1),
        ("http", texts(13, 30, 30), 160, 96, 1.0, 2),
        ("grpc", texts(14, 1, 8), 128, 128, 5.5, 3),
    ]
    expected = [
        reference(tiny_bundle, tmp_path / f"ref{i}", p, n, h, w, g, s) for i, (_, (p, n), h, w, g, s) in enumerate(cases)
    ]

    def send(case):
        protocol, (prompt, negative), height, width, guidance, seed = case
        start = time.perf_counter()
        out = infer(inprocess_server.url(protocol), protocol, request_inputs(prompt, negative, height, width, guidance, seed))
        return out, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(send, cases))
    print("\nconcurrent latencies (s): " + ", ".join(f"{seconds:.3f}" for _, seconds in results))
    for (latents, _), reference_latents, case in zip(results, expected, cases):
        assert np.array_equal(latents, reference_latents), case[0]


def test_segmented_bundle_is_served_the_same_way(triton_install, tiny_checkpoint, tiny_bundle, tmp_path):
    # The denoiser cut into segment graphs (issue 11) travels through the same inprocess repository: the runtime's
    # backend chains the segments, so the latents equal `nucleus-export run` on the single-graph bundle bit for bit.
    from nucleus_runtime.bundle import load_manifest

    from nucleus_export.export import ExportOptions, export_bundle

    segmented = tmp_path / "segmented"
    export_bundle(tiny_checkpoint, segmented, ExportOptions(resolutions=[(96, 160)], max_text_len=64, opt_text_len=16, segments=3))
    assert len(load_manifest(segmented).graph_segments("denoiser")) == 3
    repo = tmp_path / "repo"
    options = TritonOptions(layout=INPROCESS, platform=ONNXRUNTIME, onnxruntime_threads=THREADS)
    write_repository(plan_repository(segmented, options), repo)
    prompt, negative = texts(21, 7, 3)
    expected = reference(tiny_bundle, tmp_path / "ref", prompt, negative, 96, 160, 4.0, 5)
    with running_server(triton_install, repo, tmp_path / "server.log") as server:
        latents = infer(server.url("http"), "http", request_inputs(prompt, negative, 96, 160, 4.0, 5))
    assert np.array_equal(latents, expected)


def _cache_stats(log: str) -> dict[str, tuple[int, int]]:
    """Each instance's latest (text K/V cache hits, completed requests), from the model's verbose log lines."""
    pattern = r"(\w+): text K/V cache hits (\d+).*?'completed': (\d+)"
    return {m[0]: (int(m[1]), int(m[2])) for m in re.findall(pattern, log)}


def test_text_kv_is_reused_across_requests(inprocess_server):
    prompt, negative = texts(21, 7, 3)
    inputs = request_inputs(prompt, negative, 160, 96, 4.0, 0)
    before = _cache_stats(inprocess_server.log(tail=100_000))
    results = [infer(inprocess_server.url("http"), "http", inputs) for _ in range(3)]
    assert all(np.array_equal(r, results[0]) for r in results)

    def served(stats: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Requests each instance completed since `before`."""
        return {i: done - before.get(i, (0, 0))[1] for i, (_, done) in stats.items() if done != before.get(i, (0, 0))[1]}

    # The model publishes its statistics a moment after a request (every 250 ms, and when idle): wait for all three.
    deadline = time.monotonic() + 10
    while True:
        after = _cache_stats(inprocess_server.log(tail=100_000))
        completed = served(after)
        if sum(completed.values()) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(completed.values()) == 3, after
    # A new prompt: each instance that served it computed its text K/V once, every other request was a hit.
    new_hits = sum(after[i][0] - before.get(i, (0, 0))[0] for i in completed)
    assert new_hits == 3 - len(completed), after


@pytest.mark.parametrize(
    "change,message",
    [
        ({"width": np.array([200], np.int64)}, "resolution 128x200 is not in this bundle's profiles"),
        ({"negative_prompt_embeds": None}, "needs negative prompt embeddings"),
        ({"prompt_embeds": np.full((1, 6, JOINT_DIM), np.nan, np.float32)}, "prompt_embeds holds NaN"),
    ],
    ids=["wrong-width", "no-negative-prompt", "nan-embeddings"],
)
@pytest.mark.parametrize("protocol", serving.PROTOCOLS)
def test_bad_request_gets_an_error_and_the_server_keeps_serving(inprocess_server, protocol, change, message):
    prompt, negative = texts(5, 6, 2)
    good = request_inputs(prompt, negative, 128, 128, 4.0, 0)
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    with pytest.raises(InferenceServerException, match=message):
        infer(inprocess_server.url(protocol), protocol, bad)
    assert inprocess_server.process.poll() is None
    assert np.isfinite(infer(inprocess_server.url(protocol), protocol, good)).all()


# ---- every layout through the server's own config validation -------------------------------------------------------


def _model_states(install: LocalTriton, repo: Path, log_path: Path) -> tuple[dict[str, dict], str]:
    """The server's repository index (name -> state, reason) for `repo`, and its log."""
    # exit-on-error off: the server stays up to report each model, also the ones that cannot load here. Without
    # model control it loads every model before it opens its endpoints, so one query sees the final states.
    with (
        running_server(install, repo, log_path, wait_ready=False, exit_on_error="false") as server,
        contextlib.closing(tritonclient_http.InferenceServerClient(server.url("http"))) as client,
    ):
        index = {m["name"]: m for m in client.get_model_repository_index()}
    return index, server.log(200)


@pytest.mark.parametrize("layout", [INPROCESS, BLS])
def test_generated_configs_pass_the_servers_validation(triton_install, tiny_bundle, tmp_path, layout):
    repo = tmp_path / "repo"
    write_repository(plan_repository(tiny_bundle, TritonOptions(layout=layout, platform=ONNXRUNTIME)), repo)
    index, log = _model_states(triton_install, repo, tmp_path / "server.log")
    assert index[PIPELINE].get("state") == "READY", log
    if layout == INPROCESS:
        assert set(index) == {PIPELINE}
    else:
        # The wheel has no ONNX Runtime backend. The server validates a config when it reads the repository, before
        # it looks for the backend (a config that fails has no state at all, see the next test), so this reason and
        # no other means the config was accepted.
        for name in ("nucleus_text_kv", "nucleus_denoiser"):
            assert index[name].get("state") == "UNAVAILABLE", log
            assert "unable to find backend library for backend 'onnxruntime'" in index[name]["reason"], log


def test_the_servers_validation_rejects_a_broken_config(triton_install, tiny_bundle, tmp_path):
    """The control for the test above: a config the server finds invalid never gets as far as the backend."""
    repo = tmp_path / "repo"
    write_repository(plan_repository(tiny_bundle, TritonOptions(layout=BLS, platform=ONNXRUNTIME)), repo)
    config = repo / "nucleus_text_kv" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ -1, -1, 64 ]", "dims: [ -1, 0, 64 ]", 1))
    index, log = _model_states(triton_install, repo, tmp_path / "server.log")
    assert "state" not in index["nucleus_text_kv"], index
    assert "dimension must be integer >= 1" in log
