"""The step batcher (nucleus_runtime.serving) in-process on ONNX Runtime, through the Triton model's core.

Requests batched per step across requests (each at its own step, with its own text length, guidance and step count,
joining and leaving between steps) get their latents bit for bit as `generate` gives them alone, which is what
`nucleus-export run` runs; text requests too (pixels and PNG bytes as TextToImage's). Cancellation, deadlines and the
queue bounds end one request with one error and take nothing from the others; the text K/V cache stays within its
bound. The same batcher behind a real tritonserver: tests/test_triton_serving.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from nucleus_runtime.backends.onnxruntime import OrtBackend, OrtOptions
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.pipeline import generate
from nucleus_runtime.png import encode_png
from nucleus_runtime.serving import BatchSettings, Failure, ServingError, WaitingReply
from nucleus_runtime.text_to_image import TextToImage, load_prompt_tokenizer
from nucleus_runtime.triton import model as pipeline_model
from nucleus_runtime.triton.model import OUTPUT_LATENTS, PipelineCore

THREADS = 1
JOINT_DIM = 64


@pytest.fixture(scope="module")
def backend(serving_bundle) -> OrtBackend:
    return OrtBackend(serving_bundle, OrtOptions(threads=THREADS, device="cpu"))


def make_core(backend: OrtBackend, cache_bytes: int | None = None, **settings) -> PipelineCore:
    manifest, scheduler = PipelineCore.load_bundle_files(backend.bundle_dir)
    batch = BatchSettings(max_rows=manifest.profiles.batch[2], **settings)
    kwargs = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    return PipelineCore(backend, manifest, scheduler, settings=batch, **kwargs)


def request(seed: int, prompt_len: int, negative_len: int | None, size: tuple[int, int], steps: int, guidance: float,
            batch: int = 1) -> dict[str, np.ndarray]:  # fmt: skip
    """Request tensors as a Triton client sends them: embeddings (prompt masks with padding) and [1] scalars."""
    rng = np.random.default_rng(seed)
    tensors = {"prompt_embeds": rng.standard_normal((batch, prompt_len, JOINT_DIM)).astype(np.float32)}
    mask = np.ones((batch, prompt_len), np.int64)
    mask[:, prompt_len - prompt_len // 4 :] = 0  # trailing padding, as a tokenizer pads
    tensors["prompt_embeds_mask"] = mask
    if negative_len is not None:
        tensors["negative_prompt_embeds"] = rng.standard_normal((batch, negative_len, JOINT_DIM)).astype(np.float32)
    dtypes = {s.name: s.dtype for s in pipeline_model.PIPELINE_INPUTS}
    scalars = {"height": size[0], "width": size[1], "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
    tensors.update({k: np.array([v], dtype=dtypes[k]) for k, v in scalars.items()})
    return tensors


def alone(core: PipelineCore, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The request's latents from `generate` on its own (no batching, no cache): the reference."""
    return generate(
        core.backend, core.manifest, core.scheduler_config, tensors["prompt_embeds"], tensors.get("prompt_embeds_mask"),
        tensors.get("negative_prompt_embeds"), None, height=int(tensors["height"][0]), width=int(tensors["width"][0]),
        steps=int(tensors["num_inference_steps"][0]), guidance=float(tensors["guidance_scale"][0]),
        seed=int(tensors["seed"][0]),
    )  # fmt: skip


def submit(core: PipelineCore, tensors: dict[str, np.ndarray], timeout: float | None = None) -> WaitingReply:
    reply = WaitingReply()
    core.submit(tensors, {}, reply, timeout=timeout)
    return reply


# Different step counts, text lengths (prompt vs negative, and across requests), guidance with and without CFG,
# two prompts in one request, two grids.
CASES = {
    "cfg-9/4": request(1, 9, 4, (128, 128), 5, 4.0),
    "cfg-30/30": request(2, 30, 30, (128, 128), 3, 3.0),
    "no-cfg-2-prompts": request(3, 17, None, (128, 128), 4, 1.0, batch=2),
    "other-grid": request(4, 12, 5, (96, 160), 4, 5.5),
}
LATE = request(5, 1, 8, (128, 128), 3, 4.0)  # joins after two rounds


def test_batched_requests_equal_each_alone_bit_for_bit(backend):
    core = make_core(backend)
    replies = {name: submit(core, tensors) for name, tensors in CASES.items()}
    assert core.batcher.step_once() and core.batcher.step_once()
    replies["late"] = submit(core, LATE)
    core.batcher.run_until_idle()
    cases = {**CASES, "late": LATE}
    for name, reply in replies.items():
        result = reply.wait(0)
        assert np.array_equal(result.latents, alone(core, cases[name])), name
        steps = int(cases[name]["num_inference_steps"][0])
        assert [s for s, _, _ in reply.steps] == list(range(1, steps + 1)) and {t for _, t, _ in reply.steps} == {steps}
    stats = core.batcher.stats()
    rows = {name: t["prompt_embeds"].shape[0] * (2 if "negative_prompt_embeds" in t else 1) for name, t in cases.items()}
    # Every row of every step ran exactly once, in fewer denoiser calls than steps: requests shared calls.
    assert stats.denoiser_rows == sum(rows[n] * int(cases[n]["num_inference_steps"][0]) for n in cases)
    assert stats.denoiser_calls < sum(int(t["num_inference_steps"][0]) for t in cases.values())
    assert stats.mean_rows > 4
    assert stats.requests == {"received": 5, "completed": 5}
    assert stats.steppers == 0 and stats.active == stats.pending == 0  # nothing kept once idle


def test_one_request_at_a_time_is_the_same(backend):
    core = make_core(backend, max_requests=1)
    replies = {name: submit(core, tensors) for name, tensors in CASES.items()}
    core.batcher.run_until_idle()
    for name, reply in replies.items():
        assert np.array_equal(reply.wait(0).latents, alone(core, CASES[name])), name
    # Requests of one grid never share a call (the two grids still alternate).
    assert core.batcher.stats().denoiser_calls == sum(int(t["num_inference_steps"][0]) for t in CASES.values())


def test_text_kv_cache_stays_within_its_bound(backend):
    probe = make_core(backend)
    probe(request(10, 9, 9, (128, 128), 1, 4.0))
    entry = probe.cache.stats.bytes  # one request's text K/V: [L, 2, 2, 9, Hkv, Dh] float32
    assert entry > 0
    core = make_core(backend, cache_bytes=int(2.5 * entry))
    for seed in range(11, 16):  # five different prompts, one after the other: five entries for a bound of 2.5
        core(request(seed, 9, 9, (128, 128), 2, 4.0))
    stats = core.cache.stats
    assert (stats.misses, stats.hits, stats.evictions, stats.entries) == (5, 0, 3, 2)
    assert stats.bytes == 2 * entry <= core.cache.max_bytes
    core(request(15, 9, 9, (128, 128), 2, 4.0))  # the most recent prompt is still there
    assert core.cache.stats.hits == 1
    assert core.batcher.stats().text_kv_cache == {**vars(core.cache.stats)}


def test_a_cancelled_request_leaves_at_the_next_step(backend):
    core = make_core(backend, cancel_check_interval=0)
    kept, dropped = request(20, 7, 3, (128, 128), 4, 4.0), request(21, 5, 5, (128, 128), 5, 4.0)
    keep, drop = submit(core, kept), submit(core, dropped)
    core.batcher.step_once()
    core.batcher.step_once()
    drop.cancel = True
    core.batcher.run_until_idle()
    with pytest.raises(ServingError, match="cancelled by its client after 2 of 5 steps") as error:
        drop.wait(0)
    assert error.value.failure is Failure.CANCELLED
    assert np.array_equal(keep.wait(0).latents, alone(core, kept))
    assert core.batcher.stats().denoiser_rows == 2 * 2 + 2 * 4  # the cancelled rows ran two steps, then no more


def test_a_request_past_its_deadline_gets_a_clear_error(backend):
    core = make_core(backend, timeout=60.0)
    good = request(30, 6, 6, (96, 160), 3, 4.0)
    slow, fine = submit(core, request(31, 6, 6, (96, 160), 400, 4.0), timeout=0.2), submit(core, good)
    core.batcher.run_until_idle()
    with pytest.raises(ServingError, match=r"deadline of 0.2 s passed after \d+ of 400 steps") as error:
        slow.wait(0)
    assert error.value.failure is Failure.DEADLINE and "longer timeout" in str(error.value)
    assert np.array_equal(fine.wait(0).latents, alone(core, good))
    assert core.batcher.stats().requests["deadline"] == 1


def test_the_queue_is_bounded_in_length_and_in_time(backend):
    core = make_core(backend, max_requests=1, max_pending=2, queue_delay=0.05)
    first, waits = submit(core, request(40, 4, 4, (128, 128), 200, 4.0)), submit(core, request(41, 4, 4, (128, 128), 2, 4.0))
    with pytest.raises(ServingError, match="2 requests are already waiting") as full:
        submit(core, request(42, 4, 4, (128, 128), 2, 4.0))
    assert full.value.failure is Failure.UNAVAILABLE
    core.batcher.run_until_idle()
    with pytest.raises(ServingError, match="waited .* longer than the model's queue delay"):
        waits.wait(0)
    assert first.wait(0).latents.shape == (1, 64, 64)
    assert core.batcher.stats().requests == {"received": 3, "completed": 1, "unavailable": 2}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"prompt_embeds": np.zeros((5, 4, JOINT_DIM), np.float32), "prompt_embeds_mask": None,
          "negative_prompt_embeds": np.zeros((5, 4, JOINT_DIM), np.float32)}, "needs batch 10 .* serves batch 1..8"),
        ({"height": np.array([64], np.int64)}, "resolution 64x128 is not in this bundle's profiles"),
        ({"prompt_embeds": np.zeros((1, 80, JOINT_DIM), np.float32), "prompt_embeds_mask": None}, "text length 80"),
        ({"prompt": np.array([b"a fox"], dtype=object)}, "unknown inputs \\['prompt'\\]"),
    ],
    ids=["batch", "resolution", "text-length", "text-without-encoder"],
)
def test_a_request_outside_the_profile_fails_alone_while_others_run(backend, change, message):
    core = make_core(backend)
    good = request(50, 8, 3, (128, 128), 3, 4.0)
    running = submit(core, good)
    core.batcher.step_once()
    bad = {k: v for k, v in {**request(51, 8, 3, (128, 128), 3, 4.0), **change}.items() if v is not None}
    with pytest.raises(NucleusError, match=message):
        submit(core, bad)
    core.batcher.run_until_idle()
    assert np.array_equal(running.wait(0).latents, alone(core, good))


def test_the_worker_thread_serves_concurrent_submitters_and_stop_fails_the_rest(backend):
    core = make_core(backend)
    core.batcher.start()
    cases = list(CASES.values())
    replies: list[WaitingReply] = [None] * len(cases)  # type: ignore[list-item]

    def send(i: int) -> None:
        replies[i] = submit(core, cases[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for reply, tensors in zip(replies, cases):
        assert np.array_equal(reply.wait(120).latents, alone(core, tensors))
    unfinished = submit(core, request(60, 4, 4, (128, 128), 100_000, 4.0))
    core.batcher.stop()
    with pytest.raises(ServingError, match="unloaded before this request finished"):
        unfinished.wait(0)
    with pytest.raises(ServingError, match="unloading"):
        submit(core, cases[0])


# ---- text in ------------------------------------------------------------------------------------------------------


TEXT_CASES = [
    ("a red fox in fresh snow", "blurry", 4.0, 3, 3),
    ("ünïcødé lighthouse at dawn, with a much longer prompt than the others", None, 3.0, 4, 1),
    ("no guidance", None, 1.0, 2, 2),
]


def test_text_requests_are_batched_and_give_the_pixels_of_text_to_image(toy_bundle):
    backend = OrtBackend(toy_bundle, OrtOptions(threads=THREADS, device="cpu"))
    manifest, scheduler = PipelineCore.load_bundle_files(toy_bundle)
    core = PipelineCore(backend, manifest, scheduler, tokenizer=load_prompt_tokenizer(toy_bundle, manifest), images=True)
    replies = []
    for prompt, negative, guidance, steps, seed in TEXT_CASES:
        tensors = {"prompt": np.array([prompt.encode()], dtype=object), "num_inference_steps": np.array([steps]),
                   "guidance_scale": np.array([guidance], np.float32), "seed": np.array([seed]),
                   "height": np.array([64]), "width": np.array([128])}  # fmt: skip
        if negative is not None:
            tensors["negative_prompt"] = np.array([negative.encode()], dtype=object)
        replies.append(submit(core, tensors | {"return_png": np.array([True])}))
    embeds = request(70, 9, 4, (64, 128), 3, 4.0)  # an embeddings request in the same batch: latents and pixels
    replies.append(submit(core, embeds))
    core.batcher.run_until_idle()
    assert core.batcher.stats().mean_rows > 2
    with TextToImage(toy_bundle, "onnxruntime", threads=THREADS) as pipe:
        for (prompt, negative, guidance, steps, seed), reply in zip(TEXT_CASES, replies):
            result = reply.wait(0)
            expected = pipe.generate(prompt, negative, height=64, width=128, steps=steps, guidance=guidance, seed=seed)
            assert np.array_equal(result.latents, expected.latents) and np.array_equal(result.images, expected.images)
            assert result.pngs == [encode_png(expected.images[0])]
    pixels = replies[-1].wait(0)
    assert pixels.images.shape == (1, 64, 128, 3) and pixels.pngs is None  # no return_png: no PNG encoding
    outputs = pipeline_model.output_tensors(replies[0].wait(0))
    assert set(outputs) == {OUTPUT_LATENTS, pipeline_model.OUTPUT_IMAGE, pipeline_model.OUTPUT_PNG}
    stages = core.batcher.stats().stage_seconds
    assert all(stages[s] > 0 for s in stages), stages
