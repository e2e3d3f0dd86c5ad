"""TensorRT plugin sources: the kernels compile with nvcc (sm_80, sm_90, warnings as errors), the NumPy reference of
both ops matches diffusers' NucleusMoELayer, and nucleus_runtime.plugins reports bad plugin libraries clearly.

The glue (IPluginV3) compiles only against TensorRT's C++ headers, which no package installed here ships (compiled out
of tree against TensorRT 11.1's headers: plugins/README.md); plugins/gpu_check.sh runs the kernels on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
KERNEL_SOURCES = [
    PLUGINS / "common" / "nucleusKernelStatus.cu",
    PLUGINS / "expertChoiceRouterPlugin" / "expertChoiceRouterKernel.cu",
    PLUGINS / "moeCombinePlugin" / "moeCombineKernel.cu",
]
NVCC_WERROR = ["-std=c++17", "-O2", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


def _load_reference():
    spec = importlib.util.spec_from_file_location("nucleus_plugin_reference", PLUGINS / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


# ---------------------------------------------------------------------------------------------------------------
# 1. The kernels compile for sm_80 and sm_90 with warnings as errors.


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path("/usr/local/cuda/bin/nvcc")
    return str(candidate) if candidate.exists() else None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(arch: str, tmp_path: Path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in /usr/local/cuda/bin: the CUDA toolkit is needed to compile kernels")
    gencode = f"-gencode=arch=compute_{arch[3:]},code={arch}"

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        obj = tmp_path / (source.stem + ".o")
        cmd = [nvcc, *NVCC_WERROR, gencode, "-Xcompiler", "-fPIC", "-c", str(source), "-o", str(obj)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, KERNEL_SOURCES))
    for source, result in zip(KERNEL_SOURCES, results):
        assert result.returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{result.stderr}"
    # Link the objects into the shared library gpu_check.sh builds, and check the C launch API is exported.
    lib = tmp_path / "libnucleus_kernels.so"
    objects = [str(tmp_path / (s.stem + ".o")) for s in KERNEL_SOURCES]
    link = subprocess.run([nvcc, "-shared", gencode, *objects, "-o", str(lib)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    symbols = lib.read_bytes()
    for name in (
        b"nucleusExpertChoiceRouterLaunch",
        b"nucleusExpertChoiceRouterWorkspaceSize",
        b"nucleusExpertChoiceRouterCapacity",
        b"nucleusMoECombineLaunch",
        b"nucleusMoECombineWorkspaceSize",
        b"nucleusKernelStatusString",
    ):
        assert name in symbols, f"{name.decode()} missing from the kernel library"


# ---------------------------------------------------------------------------------------------------------------
# 2. The NumPy reference against diffusers' NucleusMoELayer.

torch = pytest.importorskip("torch")


def _diffusers_layer(hidden: int, inter: int, experts: int, capacity_factor: float, sigmoid: bool, scale: float):
    from diffusers.models.transformers.transformer_nucleusmoe_image import (
        NucleusMoELayer,
    )

    layer = NucleusMoELayer(
        hidden_size=hidden,
        moe_intermediate_dim=inter,
        num_experts=experts,
        capacity_factor=capacity_factor,
        use_sigmoid=sigmoid,
        route_scale=scale,
        use_grouped_mm=False,
    )
    gen = torch.Generator().manual_seed(experts * 7 + inter)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-2] if p.ndim > 1 else 1)))
    return layer.eval()


CONFIGS = [
    # batch, tokens, hidden, inter, experts, capacity factor, sigmoid, route scale
    pytest.param(1, 64, 32, 24, 8, 2.0, False, 2.5, id="softmax-E8-cf2-B1"),
    pytest.param(2, 96, 32, 16, 16, 4.0, False, 2.5, id="softmax-E16-cf4-B2"),
    pytest.param(2, 50, 24, 16, 8, 1.5, True, 1.0, id="sigmoid-E8-cf1.5-B2"),
    pytest.param(2, 40, 16, 8, 64, 2.0, False, 2.5, id="softmax-E64-C2-B2"),
    pytest.param(1, 33, 16, 8, 4, 0.25, True, 0.5, id="sigmoid-E4-cf0.25-B1"),
]


@pytest.mark.parametrize("batch,tokens,hidden,inter,experts,cf,sigmoid,scale", CONFIGS)
def test_reference_matches_diffusers_layer(batch, tokens, hidden, inter, experts, cf, sigmoid, scale, monkeypatch):
    layer = _diffusers_layer(hidden, inter, experts, cf, sigmoid, scale)
    gen = torch.Generator().manual_seed(tokens + experts)
    x = torch.randn(batch, tokens, hidden, generator=gen)
    x_unmod = torch.randn(batch, tokens, hidden, generator=gen)
    temb = torch.randn(batch, hidden, generator=gen)

    captured = {}
    real_topk = torch.topk

    def recording_topk(*args, **kwargs):
        result = real_topk(*args, **kwargs)
        captured["indices"] = result.indices.clone()
        return result

    monkeypatch.setattr(torch, "topk", recording_topk)
    with torch.no_grad():
        expected = layer(x, x_unmod, temb).numpy()
        router_input = torch.cat([temb.unsqueeze(1).expand(-1, tokens, -1), x_unmod], dim=-1)
        logits = layer.gate(router_input).numpy()
        shared = layer.shared_expert(x).numpy()
    monkeypatch.undo()

    num, den = ref.contract.capacity_fraction(cf, experts, tokens)
    # diffusers' own layer chose that many tokens per expert: the integer rule must agree with it
    assert ref.contract.capacity(num, den, tokens, experts) == captured["indices"].shape[-1]
    out, indices, gating = ref.moe_layer(
        x.numpy(),
        logits,
        shared,
        layer.experts.gate_up_proj.detach().numpy(),
        layer.experts.down_proj.detach().numpy(),
        num,
        den,
        "sigmoid" if sigmoid else "softmax",
        scale,
    )
    assert indices.dtype == np.int64 and gating.dtype == np.float32
    np.testing.assert_array_equal(indices, captured["indices"].numpy())
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)


def _torch_router(logits: torch.Tensor, capacity: int, sigmoid: bool, scale: float):
    """diffusers' router lines, on given logits."""
    bs, slen, _ = logits.shape
    scores = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=-1)
    affinity = scores.transpose(1, 2)
    top = torch.topk(affinity, k=capacity, dim=-1)
    gating = affinity.gather(-1, top.indices)
    experts = logits.shape[-1]
    flat_idx = (torch.arange(bs).view(bs, 1, 1) * slen + top.indices).transpose(0, 1).reshape(-1)
    flat_g = gating.transpose(0, 1).reshape(-1)
    sums = torch.zeros(bs * slen).scatter_add_(0, flat_idx, flat_g)
    flat_g = flat_g / (sums[flat_idx] + 1e-12) * scale
    return top.indices, flat_g.reshape(experts, bs, capacity).transpose(0, 1)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_router_gating_bitwise_equal_to_torch_cpu(sigmoid: bool):
    """Same summation order as torch's CPU scatter_add: gating is bit-identical for identical scores."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 256, 16, generator=gen)
    capacity = ref.contract.capacity(5, 2, 256, 16)
    t_idx, t_gate = _torch_router(logits, capacity, sigmoid, 2.5)
    idx, gate = ref.expert_choice_router(logits.numpy(), 5, 2, "sigmoid" if sigmoid else "softmax", 2.5)
    np.testing.assert_array_equal(idx, t_idx.numpy())
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=-1)
    if np.array_equal(ref.router_scores(logits.numpy(), "sigmoid" if sigmoid else "softmax"), scores.numpy()):
        np.testing.assert_array_equal(gate, t_gate.numpy())
    else:  # numpy's exp may differ from torch's by an ulp; then only closeness is meaningful
        np.testing.assert_allclose(gate, t_gate.numpy(), rtol=1e-6, atol=0)


def test_router_ties_lower_token_first():
    logits = np.zeros((1, 10, 4), dtype=np.float32)  # every score equal
    logits[0, 7, 2] = 1.0
    idx, gate = ref.expert_choice_router(logits, 1, 1, "softmax", 1.0)
    assert idx.shape == (1, 4, 3)
    assert idx[0, 2].tolist() == [7, 0, 1]
    assert idx[0, 0].tolist() == [0, 1, 2]
    assert np.isfinite(gate).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_combine_rounding_matches_torch_scatter_add(dtype):
    """Contributions rounded to the compute dtype, summed in float32, one rounding: bitwise diffusers on CPU."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = {torch.bfloat16: ml_dtypes.bfloat16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
    gen = torch.Generator().manual_seed(11)
    bs, slen, experts, hidden = 2, 48, 8, 32
    capacity = ref.contract.capacity(3, 1, slen, experts)
    idx, gating = ref.expert_choice_router(torch.randn(bs, slen, experts, generator=gen).numpy(), 3, 1, "softmax", 2.5)
    shared = torch.randn(bs, slen, hidden, generator=gen).to(dtype)
    expert = torch.randn(experts, bs, capacity, hidden, generator=gen).to(dtype)

    flat_idx = (torch.arange(bs).view(bs, 1, 1) * slen + torch.from_numpy(idx)).transpose(0, 1).reshape(-1)
    flat_g = torch.from_numpy(gating).transpose(0, 1).reshape(-1)
    routed = (expert.reshape(-1, hidden).float() * flat_g.unsqueeze(-1)).to(dtype)
    expected = shared.reshape(-1, hidden).scatter_add(0, flat_idx.view(-1, 1).expand(-1, hidden), routed)
    expected = expected.reshape(bs, slen, hidden).float().numpy()

    def to_np(t: torch.Tensor) -> np.ndarray:
        return t.float().numpy().astype(np_dtype)

    out = ref.moe_combine(to_np(shared), to_np(expert), idx, gating)
    assert out.dtype == np_dtype
    np.testing.assert_array_equal(out.astype(np.float32), expected)


def test_reference_rejects_bad_arguments():
    with pytest.raises(ValueError, match="score_function"):
        ref.expert_choice_router(np.zeros((1, 4, 2), np.float32), 1, 1, "relu", 1.0)
    with pytest.raises(ValueError, match="positive"):
        ref.contract.capacity(0, 1, 4, 2)
    with pytest.raises(ValueError, match="exceeds"):
        ref.expert_choice_router(np.zeros((1, 4, 2), np.float32), 8, 1, "softmax", 1.0)


# ---------------------------------------------------------------------------------------------------------------
# 3. nucleus_runtime.plugins: clear errors for bad plugin libraries.

from nucleus_runtime import plugins as rt_plugins  # noqa: E402
from nucleus_runtime.bundle import sha256_file
from nucleus_runtime.errors import NucleusError  # noqa: E402


def _fake_elf(path: Path, e_type: int = 3, payload: bytes = b"") -> Path:
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<H", e_type) + bytes(46)
    path.write_bytes(header + payload)
    return path


ALL_NAMES = b"\0".join(n.encode() for n in (*rt_plugins.PLUGIN_NAMES, *rt_plugins.ENTRY_SYMBOLS))


def test_plugin_library_missing(tmp_path: Path):
    with pytest.raises(NucleusError, match="does not exist") as err:
        rt_plugins.find_plugin_library(tmp_path / "libnucleus_trt_plugins.so")
    assert "cmake" in err.value.fix
    with pytest.raises(NucleusError, match="No libnucleus_trt_plugins.so in"):
        rt_plugins.find_plugin_library(tmp_path)


def test_plugin_library_not_elf(tmp_path: Path):
    text = tmp_path / "libnucleus_trt_plugins.so"
    text.write_text("not a library")
    with pytest.raises(NucleusError, match="not an ELF shared object"):
        rt_plugins.find_plugin_library(text)
    obj = _fake_elf(tmp_path / "obj.so", e_type=1, payload=ALL_NAMES)
    with pytest.raises(NucleusError, match="relocatable object"):
        rt_plugins.find_plugin_library(obj)


def test_plugin_library_without_plugins(tmp_path: Path):
    lib = _fake_elf(tmp_path / "libother.so", payload=b"getCreators\0setLoggerFinder\0MoECombine")
    with pytest.raises(NucleusError, match="lacks ExpertChoiceRouter") as err:
        rt_plugins.find_plugin_library(lib)
    assert "libnucleus_kernels.so" in err.value.fix


def test_plugin_library_found_in_bundle(tmp_path: Path):
    (tmp_path / "plugins").mkdir()
    lib = _fake_elf(tmp_path / "plugins" / rt_plugins.LIBRARY_NAME, payload=ALL_NAMES)
    assert rt_plugins.find_plugin_library(tmp_path) == lib.resolve()
    assert rt_plugins.load_plugin_library(lib) == lib.resolve()  # no TensorRT module: static checks only


class _FakeRegistry:
    def __init__(self, handle, creators):
        self.handle, self.creators, self.loaded = handle, creators, []

    def load_library(self, path):
        self.loaded.append(path)
        return self.handle

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


class _FakeTrt:
    def __init__(self, registry):
        self.registry = registry

    def get_plugin_registry(self):
        return self.registry


def test_load_plugin_library_through_registry(tmp_path: Path):
    lib = _fake_elf(tmp_path / rt_plugins.LIBRARY_NAME, payload=ALL_NAMES)
    creators = {(n, "1", "nucleus"): object() for n in rt_plugins.PLUGIN_NAMES}

    class Registering(_FakeRegistry):
        def load_library(self, path):
            super().load_library(path)
            self.creators = creators
            return self.handle

    registry = Registering(handle=object(), creators={})
    sha = sha256_file(lib)
    with pytest.raises(NucleusError, match="without a checksum"):
        rt_plugins.load_plugin_library(lib, _FakeTrt(registry))
    with pytest.raises(NucleusError, match="not the recorded"):
        rt_plugins.load_plugin_library(lib, _FakeTrt(registry), sha256="0" * 64)
    assert registry.loaded == []
    assert rt_plugins.load_plugin_library(lib, _FakeTrt(registry), sha256=sha) == lib.resolve()
    assert registry.loaded == [str(lib.resolve())]
    rt_plugins.load_plugin_library(lib, _FakeTrt(registry), sha256=sha)  # already registered: not loaded twice
    assert len(registry.loaded) == 1

    with pytest.raises(NucleusError, match="refused"):
        rt_plugins.load_plugin_library(lib, _FakeTrt(_FakeRegistry(handle=None, creators={})), sha256=sha)
    with pytest.raises(NucleusError, match="no creator for ExpertChoiceRouter, MoECombine"):
        rt_plugins.load_plugin_library(lib, _FakeTrt(_FakeRegistry(handle=object(), creators={})), sha256=sha)


def test_real_registry_reports_library_without_creators(tmp_path: Path):
    """A genuine shared library exporting the entry points but no creators, loaded by TensorRT-RTX's registry."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in library")
    src = tmp_path / "empty.c"
    src.write_text(
        'const char* nucleus_names[] = {"ExpertChoiceRouter", "MoECombine"};\n'
        "void setLoggerFinder(void* finder) { (void)finder; }\n"
        "void* const* getCreators(int* n) { static void* none[1] = {0}; *n = 0; return none; }\n"
    )
    lib = tmp_path / rt_plugins.LIBRARY_NAME
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    with pytest.raises(NucleusError, match="no creator for|refused|could not load"):
        rt_plugins.load_plugin_library(lib, trt, sha256=sha256_file(lib))


# ---------------------------------------------------------------------------------------------------------------
# 4. The Python side of the GPU check runs here: its torch references agree with reference.py on the CPU.


def test_gpu_check_cpu_selftest_and_arguments():
    spec = importlib.util.spec_from_file_location("nucleus_gpu_check", PLUGINS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    args = gpu_check.parse_args([])
    assert (args.batch, args.experts, args.hidden, args.bench_tokens) == (2, 64, 2048, 4096)
    assert args.tokens == [4096, 16384] and args.capacity_factors == [2.0, 4.0]
    assert gpu_check.main(["--cpu-selftest"]) == 0
    # The whole-layer check's routing agreement (run here on CPU tensors): share of the expected selections kept.
    import torch

    expected = torch.tensor([[[0, 1, 2], [3, 4, 5]]])
    assert gpu_check.routing_agreement(torch, expected, expected) == 1.0
    assert gpu_check.routing_agreement(torch, torch.tensor([[[0, 1, 6], [3, 7, 8]]]), expected) == pytest.approx(0.5)
    script = (PLUGINS / "gpu_check.sh").read_text()
    assert "gpu_check.py" in script and "-Werror" in script
    assert subprocess.run(["bash", "-n", str(PLUGINS / "gpu_check.sh")]).returncode == 0


def test_gpu_check_loads_the_kernel_library_only_when_it_matches_its_recorded_sha256(tmp_path):
    spec = importlib.util.spec_from_file_location("nucleus_gpu_check", PLUGINS / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    library = tmp_path / "libnucleus_kernels.so"
    library.write_bytes(b"\x7fELF kernels")
    with pytest.raises(SystemExit, match="records no checksum"):
        gpu_check.verify_kernel_library(library)
    record = {"sha256": hashlib.sha256(library.read_bytes()).hexdigest(), "bytes": library.stat().st_size}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {library.name: record}}))
    assert gpu_check.verify_kernel_library(library) == library
    library.write_bytes(b"\x7fELF tampered")
    with pytest.raises(SystemExit, match="does not match its sha256"):
        gpu_check.verify_kernel_library(library)
