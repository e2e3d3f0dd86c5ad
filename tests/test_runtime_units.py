"""Runtime pieces without a bundle: latent packing, seeded noise, the text K/V cache, the loop on a numpy backend."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import NucleusMoEImagePipeline
from nucleus_runtime.backends.base import Backend, TensorHandle
from nucleus_runtime.bundle import EngineRecord, GraphIO, LoweringRecord, Manifest, Profiles, StageRecord
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.latents import initial_noise, pack_latents, unpack_latents
from nucleus_runtime.pipeline import generate, guidance_combine
from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG, SchedulerConfig
from nucleus_runtime.text_kv_cache import TextKVCache, text_kv_key

# ---- latents ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 5), (8, 6)])
def test_pack_unpack_match_pipeline(rows, cols):
    pipe = NucleusMoEImagePipeline
    p, c = 2, 16
    x = np.random.default_rng(0).standard_normal((2, 1, c, rows * p, cols * p)).astype(np.float32)
    ref = pipe._pack_latents(torch.from_numpy(x), 2, c, rows * p, cols * p, p).numpy()
    packed = pack_latents(x, p)
    np.testing.assert_array_equal(packed, ref)
    # The pipeline's unpack takes pixels and the VAE scale (8).
    ref_un = pipe._unpack_latents(torch.from_numpy(ref), rows * p * 8, cols * p * 8, p, 8).numpy()
    np.testing.assert_array_equal(unpack_latents(packed, (rows, cols), p), ref_un)
    np.testing.assert_array_equal(unpack_latents(packed, (rows, cols), p)[:, :, 0], x[:, 0])


def test_seeded_noise_is_deterministic_and_packed():
    a = initial_noise(7, 1, 64, (6, 4), 2)
    assert a.shape == (1, 24, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, initial_noise(7, 1, 64, (6, 4), 2))
    assert not np.array_equal(a, initial_noise(8, 1, 64, (6, 4), 2))
    assert abs(float(a.std()) - 1.0) < 0.1


# ---- cache -----------------------------------------------------------------------------------------------------


class ArrayKV(TensorHandle):
    def __init__(self, array: np.ndarray):
        self.array = array

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def to_numpy(self) -> np.ndarray:
        return self.array


def test_key_depends_on_content_grid_mask_and_namespace():
    e = np.ones((1, 4, 8), np.float32)
    m = np.ones((1, 4), np.int64)
    base = text_kv_key("ns", e, m, (4, 4))
    assert text_kv_key("ns", e.copy(), m.copy(), (4, 4)) == base  # content, not identity
    assert text_kv_key("ns", e, m, (4, 6)) != base
    assert text_kv_key("ns", e, np.array([[1, 1, 1, 0]]), (4, 4)) != base
    e2 = e.copy()
    e2[0, 0, 0] = 2
    assert text_kv_key("ns", e2, m, (4, 4)) != base
    assert text_kv_key("other", e, m, (4, 4)) != base
    assert text_kv_key("ns", e.reshape(1, 8, 4), m.reshape(1, 4), (4, 4)) != base  # shape is part of the key


def test_cache_lru_by_bytes_and_counters():
    cache = TextKVCache(max_bytes=3 * 400)
    calls = []

    def make(tag):
        def compute():
            calls.append(tag)
            return ArrayKV(np.zeros(100, np.float32))  # 400 bytes

        return compute

    for tag in "abc":
        cache.get_or_compute(tag, make(tag))
    cache.get_or_compute("a", make("a"))  # hit; b is now the least recently used
    cache.get_or_compute("d", make("d"))  # evicts b
    cache.get_or_compute("b", make("b"))  # miss again, evicts c
    assert calls == ["a", "b", "c", "d", "b"]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (1, 5, 2, 3, 1200)


def test_entry_larger_than_bound_is_returned_not_kept():
    cache = TextKVCache(max_bytes=100)
    handle = cache.get_or_compute("big", lambda: ArrayKV(np.zeros(1000, np.float32)))
    assert handle.nbytes == 4000 and len(cache) == 0


# ---- the loop on a numpy backend --------------------------------------------------------------------------------


class NumpyBackend(Backend):
    """A toy model with the bundle's I/O: text K/V mixes embeddings with the text rope; the denoiser attends over
    the masked text K/V, so padding and grid both matter, as in the real model."""

    name = "numpy-toy"

    def __init__(self, dim: int = 8, channels: int = 64):
        rng = np.random.default_rng(1)
        self.w_text = rng.standard_normal((dim, channels)).astype(np.float32) / np.sqrt(dim)
        self.text_kv_calls = 0

    def compute_text_kv(self, encoder_hidden_states, txt_rope_cos, txt_rope_sin):
        self.text_kv_calls += 1
        k = (encoder_hidden_states @ self.w_text) * txt_rope_cos[:, :1] + txt_rope_sin[:, :1]
        return ArrayKV(np.stack([k, 2 * k])[None].astype(np.float32))  # [L=1, 2, B, T, C]

    def denoise(self, hidden_states, timestep, img_rope_cos, img_rope_sin, text_kv, encoder_hidden_states_mask):
        k = text_kv.array[0, 0]
        m = encoder_hidden_states_mask[:, :, None].astype(np.float32)
        context = (k * m).sum(1, keepdims=True) / m.sum(1, keepdims=True)
        return (hidden_states * (1 - timestep[:, None, None]) + context + img_rope_sin[None, :, :1]).astype(np.float32)


def toy_manifest(engines: dict | None = None) -> Manifest:
    stage = StageRecord(GraphIO({}, {}), "sha256:toy")
    return Manifest(
        model_config={"joint_attention_dim": 8, "patch_size": 2, "in_channels": 64, "axes_dims_rope": [8, 12, 12],
                      "num_layers": 1},
        config_hash="toy",
        precision="fp32",
        profiles=Profiles(batch=(1, 2, 4), text_len=(1, 16, 32), resolutions=[(64, 64), (96, 64)], grids=[(4, 4), (6, 4)], opt_resolution=(64, 64)),
        stages={"text_kv": stage, "denoiser": dataclasses.replace(stage, engines=engines or {})},
        files={},
    )


SCHED = SchedulerConfig.from_dict(DEFAULT_SCHEDULER_CONFIG)


def _texts(seed=0, t_pos=5, t_neg=3, batch=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, t_pos, 8)).astype(np.float32), rng.standard_normal((batch, t_neg, 8)).astype(np.float32)


def _run(backend, **kw):
    pos, neg = _texts()
    args = dict(height=64, width=64, steps=4, guidance=4.0, seed=3)
    args.update(kw)
    return generate(backend, toy_manifest(), SCHED, pos, None, neg, None, **args)


def test_cached_uncached_and_cache_reuse_identical():
    backend = NumpyBackend()
    cache = TextKVCache()
    cached = _run(backend, cache=cache)
    assert backend.text_kv_calls == 1
    again = _run(backend, cache=cache)
    assert backend.text_kv_calls == 1 and cache.stats.hits == 1
    uncached = _run(backend, recompute_text_kv=True)
    assert backend.text_kv_calls == 1 + 4
    np.testing.assert_array_equal(cached, again)
    np.testing.assert_array_equal(cached, uncached)
    _run(backend, cache=cache, height=96)  # another grid: another key
    assert cache.stats.misses == 2


def test_cfg_batch_equals_two_separate_calls():
    """Padding the shorter text and batching prompt + negative gives the pipeline's two-call result."""
    backend = NumpyBackend()
    pos, neg = _texts()
    manifest = toy_manifest()
    out = generate(backend, manifest, SCHED, pos, None, neg, None, height=64, width=64, steps=3, guidance=3.5, seed=5)

    from nucleus_runtime.latents import initial_noise
    from nucleus_runtime.rope import image_rope, text_rope
    from nucleus_runtime.scheduler import make_schedule

    lat = initial_noise(5, 1, 64, (4, 4), 2)
    schedule = make_schedule(SCHED, 3, 16)
    cos, sin = image_rope((8, 12, 12), 4, 4)
    for i in range(3):
        preds = []
        for text in (pos, neg):
            kv = backend.compute_text_kv(text, *text_rope((8, 12, 12), 4, 4, text.shape[1]))
            preds.append(backend.denoise(lat, schedule.model_timestep(i, 1), cos, sin, kv, np.ones(text.shape[:2], np.int64)))
        lat = schedule.step(-guidance_combine(preds[0], preds[1], 3.5), i, lat)
    np.testing.assert_allclose(out, lat, rtol=1e-6, atol=1e-6)


def test_guidance_combine_matches_pipeline_formula():
    rng = np.random.default_rng(0)
    pos, neg = rng.standard_normal((2, 1, 16, 64)).astype(np.float32)
    tp, tn = torch.from_numpy(pos), torch.from_numpy(neg)
    comb = tn + 4.0 * (tp - tn)
    ref = comb * (torch.norm(tp, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    np.testing.assert_allclose(guidance_combine(pos, neg, 4.0), ref.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"prompt_embeds": np.zeros((1, 5, 7), np.float32)}, "width 7"),
        ({"prompt_embeds": np.zeros((5, 8), np.float32)}, "batch, text_len"),
        ({"prompt_mask": np.ones((1, 4))}, "prompt_embeds_mask has shape"),
        ({"negative_prompt_embeds": None}, "negative prompt"),
        ({"negative_prompt_embeds": np.zeros((2, 3, 8), np.float32)}, "batch 2"),
        ({"height": 80}, "not in this bundle's profiles"),
        ({"prompt_embeds": np.zeros((1, 40, 8), np.float32)}, "text length 40"),
        ({"prompt_embeds": np.zeros((3, 5, 8), np.float32), "negative_prompt_embeds": np.zeros((3, 5, 8), np.float32)}, "batch 6"),
        ({"latents": np.zeros((1, 15, 64), np.float32)}, "packed layout"),
        ({"seed": None}, "seed"),
    ],
)
def test_bad_input_is_a_clear_error(kw, needle):
    pos, neg = _texts()
    args = dict(prompt_embeds=pos, prompt_mask=None, negative_prompt_embeds=neg, negative_prompt_mask=None,
                height=64, width=64, steps=2, guidance=4.0, seed=0)
    args.update(kw)
    with pytest.raises(NucleusError, match=needle):
        generate(NumpyBackend(), toy_manifest(), SCHED, **args)


def test_runtime_imports_without_torch_or_diffusers():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import nucleus_runtime, nucleus_runtime.pipeline, nucleus_runtime.backends.onnxruntime\n"
        "import nucleus_runtime.backends.tensorrt, nucleus_runtime.text_kv_cache, nucleus_runtime.scheduler\n"
        "assert not any(m.split('.')[0] in ('torch', 'diffusers') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- TensorRT backend logic that needs no GPU ----------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("SM89", (8, 9)), ("sm_120", (12, 0)), ("9.0", (9, 0)), ("86", (8, 6)), ([9, 0], (9, 0))])
def test_parse_compute_capability(value, expected):
    from nucleus_runtime.backends.tensorrt import parse_compute_capability

    assert parse_compute_capability(value) == expected


def test_engine_for_another_gpu_is_refused():
    from nucleus_runtime.backends.tensorrt import TensorRTBackend

    class Props:
        major, minor, name = 9, 0, b"NVIDIA H100"

    class FakeCudart:
        def cudaGetDevice(self):
            return (0, 0)

        def cudaGetDeviceProperties(self, device):
            return (0, Props())

    backend = object.__new__(TensorRTBackend)  # only the GPU check, without TensorRT or a GPU
    backend.cudart = FakeCudart()
    lowering = LoweringRecord("native", "onehot")
    backend.manifest = toy_manifest({"denoiser": EngineRecord("tensorrt-rtx", "1", lowering, ["SM89", "SM120"])})
    with pytest.raises(NucleusError, match=r"built for SM89, SM120, but this GPU \(NVIDIA H100\) is SM90"):
        backend._check_gpu()
    backend.manifest = toy_manifest({"denoiser": EngineRecord("tensorrt", "1", lowering, None)})  # the builder's GPU
    backend._check_gpu()
