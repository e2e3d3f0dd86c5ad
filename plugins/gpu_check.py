"""GPU check of the nucleus plugin kernels (run through plugins/gpu_check.sh, which compiles them first).

1. Correctness at the real sizes (B=2, E=64, H=2048, S in {4096, 16384}, capacity factors 2 and 4, float32 /
   bfloat16 / float16): the router and the combine from libnucleus_kernels.so (ctypes) against PyTorch references,
   on fresh random inputs, into poisoned outputs (every element must be written), twice (bitwise deterministic).
2. Timing: router and combine vs the PyTorch ops they replace (diffusers' lines), and the whole MoE layer (gate +
   router + gather + batched expert GEMMs + shared expert + combine) vs diffusers' NucleusMoELayer with
   use_grouped_mm=True, bf16, B=2, S=4096. Goal: the layer at least 1.5x faster than diffusers' eager layer.
   Fidelity: diffusers' bf16 layer and the kernels' bf16 layer are both compared with diffusers' float32 layer on the
   same inputs and weights (relative error, routing agreement); the check passes when the kernels' layer is no worse.

`--cpu-selftest` runs the PyTorch references on the CPU against plugins/reference.py (no GPU, no library).
Exit status: 0 when every correctness check passes (the speed goal is reported, not enforced).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import hashlib
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
STATUS = {0: "success", 1: "invalid argument", 2: "workspace too small", 3: "unsupported shape", 4: "CUDA error"}
INDEX_POISON = -7


def load_reference():
    spec = importlib.util.spec_from_file_location("nucleus_plugin_reference", HERE / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = load_reference()
CONTRACT = REFERENCE.contract


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", type=Path, default=HERE.parent / "build" / "gpu_check" / "libnucleus_kernels.so",
                   help="kernel library built by gpu_check.sh")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1344, help="moe_intermediate_dim of the layer benchmark")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="S values of the correctness checks")
    p.add_argument("--capacity-factors", type=float, nargs="+", default=[2.0, 4.0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], choices=list(DTYPE_CODES))
    p.add_argument("--bench-tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--seed", type=int, default=None, help="default: fresh random inputs every run")
    p.add_argument("--skip-layer", action="store_true", help="skip the whole-layer benchmark")
    p.add_argument("--cpu-selftest", action="store_true", help="check the torch references against reference.py")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# PyTorch references (device-agnostic; the CPU self-test checks them against the NumPy reference).


def torch_router_reference(torch, logits, capacity: int, sigmoid: bool, route_scale: float):
    """The op's definition in torch: float32 scores, stable descending order, ascending-expert token sums."""
    scores = torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=-1)
    affinity = scores.transpose(1, 2)  # [B, E, S]
    order = torch.sort(affinity, dim=-1, descending=True, stable=True).indices[..., :capacity]
    values = affinity.gather(-1, order)
    bsz, experts = affinity.shape[0], affinity.shape[1]
    dense = torch.zeros(bsz, experts, affinity.shape[2], device=logits.device, dtype=torch.float32)
    dense.scatter_(-1, order, values)
    sums = torch.zeros(bsz, affinity.shape[2], device=logits.device, dtype=torch.float32)
    for e in range(experts):  # ascending expert order, like the kernel
        sums = sums + dense[:, e]
    gating = values / (sums.gather(-1, order.reshape(bsz, -1)).reshape(order.shape) + 1e-12)
    return order, gating * route_scale, affinity


def torch_combine_reference(torch, shared, expert, indices, gating):
    """float32 accumulation from shared, contributions rounded to the dtype, ascending experts, one final rounding."""
    bsz, slen, hidden = shared.shape
    experts = expert.shape[0]
    contrib = (expert.float() * gating.transpose(0, 1).unsqueeze(-1)).to(shared.dtype).float()  # [E, B, C, H]
    acc = shared.float().reshape(bsz * slen, hidden).clone()
    offsets = (torch.arange(bsz, device=shared.device) * slen).view(bsz, 1)
    for e in range(experts):  # distinct tokens within one expert: each index_add_ is order-free
        acc.index_add_(0, (indices[:, e] + offsets).reshape(-1), contrib[e].reshape(-1, hidden))
    return acc.reshape(bsz, slen, hidden).to(shared.dtype)


def torch_router_ops(torch, logits, capacity: int, sigmoid: bool, route_scale: float):
    """diffusers' router lines (what the router kernel replaces)."""
    bsz, slen, experts = logits.shape
    scores = (torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=-1)).to(logits.dtype)
    affinity = scores.transpose(1, 2)
    top = torch.topk(affinity, k=capacity, dim=-1)
    gating = affinity.gather(-1, top.indices)
    offsets = torch.arange(bsz, device=logits.device).view(bsz, 1, 1) * slen
    flat_idx = (offsets + top.indices).transpose(0, 1).reshape(-1)
    flat_g = gating.transpose(0, 1).reshape(-1)
    sums = torch.zeros(bsz * slen, device=logits.device, dtype=flat_g.dtype).scatter_add_(0, flat_idx, flat_g)
    flat_g = flat_g / (sums[flat_idx] + 1e-12) * route_scale
    return flat_idx, flat_g


def torch_combine_ops(torch, shared_flat, routed, flat_idx, flat_g):
    """diffusers' combine lines (what the combine kernel replaces)."""
    hidden = shared_flat.shape[-1]
    weighted = (routed.float() * flat_g.unsqueeze(-1)).to(shared_flat.dtype)
    return shared_flat.scatter_add(0, flat_idx.reshape(-1, 1).expand(-1, hidden), weighted)


def cpu_selftest() -> int:
    import torch

    ref = REFERENCE
    rng = np.random.default_rng(0)
    for sigmoid in (False, True):
        logits = rng.standard_normal((2, 200, 16)).astype(np.float32)
        num, den = 5, 2
        capacity = ref.contract.capacity(num, den, 200, 16)
        t_idx, t_gate, _ = torch_router_reference(torch, torch.from_numpy(logits), capacity, sigmoid, 2.5)
        n_idx, n_gate = ref.expert_choice_router(logits, num, den, "sigmoid" if sigmoid else "softmax", 2.5)
        assert np.array_equal(t_idx.numpy(), n_idx), "router indices differ from reference.py"
        np.testing.assert_allclose(t_gate.numpy(), n_gate, rtol=1e-6, atol=0)
        flat_idx, flat_g = torch_router_ops(torch, torch.from_numpy(logits), capacity, sigmoid, 2.5)
        np.testing.assert_allclose(flat_g.reshape(16, 2, capacity).transpose(0, 1).numpy(), n_gate, rtol=1e-6)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        idx, gate = ref.expert_choice_router(rng.standard_normal((2, 64, 8)).astype(np.float32), 2, 1, "softmax", 2.5)
        shared = torch.randn(2, 64, 24).to(dtype)
        expert = torch.randn(8, 2, idx.shape[-1], 24).to(dtype)
        got = torch_combine_reference(torch, shared, expert, torch.from_numpy(idx), torch.from_numpy(gate))
        flat_idx = (torch.from_numpy(idx) + torch.arange(2).view(2, 1, 1) * 64).transpose(0, 1).reshape(-1)
        flat_g = torch.from_numpy(gate).transpose(0, 1).reshape(-1)
        ops = torch_combine_ops(torch, shared.reshape(-1, 24), expert.reshape(-1, 24), flat_idx, flat_g)
        assert torch.equal(got.reshape(-1, 24), ops), f"combine reference != torch CPU scatter_add for {dtype}"
    print("cpu self-test: torch references agree with plugins/reference.py and diffusers' CPU ops")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# The kernel library.


def verify_kernel_library(path: Path) -> Path:
    """The kernel library, checked against the sha256 gpu_check.sh recorded beside it (manifest.json, a bundle
    manifest's `files` record) before anything loads it."""
    if not path.is_file():
        raise SystemExit(f"kernel library {path} not found: run plugins/gpu_check.sh (it compiles it)")
    manifest = path.parent / "manifest.json"
    try:
        record = json.loads(manifest.read_text())["files"][path.name]
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"{manifest} records no checksum for {path.name}: run plugins/gpu_check.sh (it compiles and records it)") from None
    if path.stat().st_size != record["bytes"] or hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise SystemExit(f"{path} does not match its sha256 in {manifest}: run plugins/gpu_check.sh to rebuild it")
    return path


class Kernels:
    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(verify_kernel_library(path)))
        c_int, c_size, c_ptr, c_float, c_i64 = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_float, ctypes.c_int64
        lib.nucleusExpertChoiceRouterCapacity.argtypes = [c_i64, c_i64, c_i64, c_i64]
        lib.nucleusExpertChoiceRouterCapacity.restype = c_i64
        lib.nucleusExpertChoiceRouterWorkspaceSize.argtypes = [c_int] * 4
        lib.nucleusExpertChoiceRouterWorkspaceSize.restype = c_size
        lib.nucleusExpertChoiceRouterLaunch.argtypes = [c_ptr, c_int, c_int, c_int, c_int, c_int, c_int, c_float,
                                                        c_ptr, c_ptr, c_ptr, c_size, c_ptr]
        lib.nucleusExpertChoiceRouterLaunch.restype = c_int
        lib.nucleusMoECombineWorkspaceSize.argtypes = [c_int] * 4
        lib.nucleusMoECombineWorkspaceSize.restype = c_size
        lib.nucleusMoECombineLaunch.argtypes = [c_ptr, c_ptr, c_ptr, c_ptr, c_ptr, c_int, c_int, c_int, c_int, c_int,
                                                c_int, c_ptr, c_size, c_ptr]
        lib.nucleusMoECombineLaunch.restype = c_int
        lib.nucleusKernelLastCudaError.restype = c_int
        self.lib = lib
        self._workspace = {}

    def workspace(self, torch, key: str, nbytes: int):
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 256), dtype=torch.uint8, device="cuda")
            self._workspace[key] = buf
        return buf

    def _check(self, status: int, what: str):
        if status != 0:
            extra = f" (cudaError {self.lib.nucleusKernelLastCudaError()})" if status == 4 else ""
            raise RuntimeError(f"{what} failed: {STATUS.get(status, status)}{extra}")

    def capacity(self, num: int, den: int, slen: int, experts: int) -> int:
        return int(self.lib.nucleusExpertChoiceRouterCapacity(num, den, slen, experts))

    def router(self, torch, logits, capacity: int, sigmoid: bool, route_scale: float, indices=None, gating=None):
        bsz, slen, experts = logits.shape
        if indices is None:
            indices = torch.empty(bsz, experts, capacity, dtype=torch.int64, device="cuda")
            gating = torch.empty(bsz, experts, capacity, dtype=torch.float32, device="cuda")
        nbytes = self.lib.nucleusExpertChoiceRouterWorkspaceSize(bsz, slen, experts, capacity)
        ws = self.workspace(torch, "router", nbytes)
        status = self.lib.nucleusExpertChoiceRouterLaunch(
            logits.data_ptr(), DTYPE_CODES[str(logits.dtype).split(".")[-1]], bsz, slen, experts, capacity,
            int(sigmoid), route_scale, indices.data_ptr(), gating.data_ptr(), ws.data_ptr(), ws.numel(),
            torch.cuda.current_stream().cuda_stream)
        self._check(status, "router")
        return indices, gating

    def combine(self, torch, shared, expert, indices, gating, out=None):
        bsz, slen, hidden = shared.shape
        experts, capacity = indices.shape[1], indices.shape[2]
        out = torch.empty_like(shared) if out is None else out
        ws = self.workspace(torch, "combine", self.lib.nucleusMoECombineWorkspaceSize(bsz, slen, experts, capacity))
        status = self.lib.nucleusMoECombineLaunch(
            shared.data_ptr(), expert.data_ptr(), indices.data_ptr(), gating.data_ptr(), out.data_ptr(),
            DTYPE_CODES[str(shared.dtype).split(".")[-1]], bsz, slen, experts, capacity, hidden,
            ws.data_ptr(), ws.numel(), torch.cuda.current_stream().cuda_stream)
        self._check(status, "combine")
        return out


# ------------------------------------------------------------------------------------------------------------------
# Correctness.


def check_router(torch, k: Kernels, bsz, slen, experts, cf, sigmoid, dtype, failures):
    num, den = CONTRACT.capacity_fraction(cf, experts, slen)
    capacity = k.capacity(num, den, slen, experts)
    assert capacity == CONTRACT.capacity_from_factor(cf, slen, experts), "capacity rule differs from diffusers'"
    logits = (torch.randn(bsz, slen, experts, device="cuda") * 2.0).to(getattr(torch, dtype))
    indices = torch.full((bsz, experts, capacity), INDEX_POISON, dtype=torch.int64, device="cuda")
    gating = torch.full((bsz, experts, capacity), float("nan"), dtype=torch.float32, device="cuda")
    k.router(torch, logits, capacity, sigmoid, 2.5, indices, gating)
    ref_idx, ref_gate, affinity = torch_router_reference(torch, logits, capacity, sigmoid, 2.5)
    torch.cuda.synchronize()
    name = f"router {'sigmoid' if sigmoid else 'softmax'} {dtype:8s} S={slen:5d} cf={cf:g} C={capacity:4d}"
    problems = []
    if (indices == INDEX_POISON).any() or torch.isnan(gating).any():
        problems.append("unwritten output elements")
    if ((indices < 0) | (indices >= slen)).any():
        problems.append("index out of range")
    sorted_idx = indices.sort(dim=-1).values
    if (sorted_idx[..., 1:] == sorted_idx[..., :-1]).any():
        problems.append("an expert picked a token twice")
    same = indices == ref_idx
    agreement = same.float().mean().item()
    if not same.all():
        # Allowed only at float32 near-ties: the picked scores must equal the reference's, position by position.
        picked = affinity.gather(-1, indices.clamp(0, slen - 1))
        expected = affinity.gather(-1, ref_idx)
        if not torch.allclose(picked, expected, rtol=1e-6, atol=0):
            problems.append(f"selection differs beyond ties (agreement {agreement:.6f})")
    close = torch.isclose(gating, ref_gate, rtol=1e-5, atol=1e-7) | ~same
    if not close.all():
        problems.append(f"gating differs: max abs {(gating - ref_gate)[~close].abs().max().item():.3e}")
    again_idx, again_gate = k.router(torch, logits, capacity, sigmoid, 2.5)
    if not (torch.equal(again_idx, indices) and torch.equal(again_gate, gating)):
        problems.append("not deterministic")
    report(name, problems, f"index agreement {agreement:.6f}", failures)


def check_combine(torch, k: Kernels, bsz, slen, experts, hidden, cf, dtype, failures):
    num, den = CONTRACT.capacity_fraction(cf, experts, slen)
    capacity = k.capacity(num, den, slen, experts)
    tdtype = getattr(torch, dtype)
    logits = torch.randn(bsz, slen, experts, device="cuda")
    indices, gating = k.router(torch, logits, capacity, False, 2.5)
    shared = torch.randn(bsz, slen, hidden, device="cuda").to(tdtype)
    expert = torch.randn(experts, bsz, capacity, hidden, device="cuda").to(tdtype)
    out = torch.full_like(shared, float("nan"))
    k.combine(torch, shared, expert, indices, gating, out)
    expected = torch_combine_reference(torch, shared, expert, indices, gating)
    torch.cuda.synchronize()
    name = f"combine {dtype:8s} S={slen:5d} cf={cf:g} C={capacity:4d} H={hidden}"
    problems = []
    if torch.isnan(out).any():
        problems.append("unwritten output elements")
    exact = torch.equal(out, expected)
    if not exact:
        diff = (out.float() - expected.float()).abs()
        tol = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype] * expected.float().abs().clamp_min(1.0)
        if (diff > tol).any():
            problems.append(f"differs from reference: max abs {diff.max().item():.3e}")
    again = k.combine(torch, shared, expert, indices, gating)
    if not torch.equal(again, out):
        problems.append("not deterministic")
    report(name, problems, "bitwise equal to reference" if exact else "within tolerance (not bitwise)", failures)


def report(name, problems, detail, failures):
    status = "ok  " if not problems else "FAIL"
    print(f"  [{status}] {name}: {detail}" + ("" if not problems else " -- " + "; ".join(problems)))
    if problems:
        failures.append(name)


# ------------------------------------------------------------------------------------------------------------------
# Timing.


def time_ms(torch, fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_layers(torch, args, grouped: bool):
    """diffusers' NucleusMoELayer with random weights (std 1/sqrt(fan_in)) rounded to bf16, as a float32 layer (the
    truth) and a bf16 layer (diffusers served in bf16); None when diffusers is not installed."""
    try:
        from diffusers.models.transformers.transformer_nucleusmoe_image import (
            NucleusMoELayer,
        )
    except Exception as exc:  # diffusers missing on the GPU machine
        print(f"  diffusers not importable ({exc}); whole-layer comparison skipped")
        return None
    truth = NucleusMoELayer(args.hidden, args.inter, args.experts, 2.0, False, 2.5, use_grouped_mm=grouped)
    truth = truth.to(device="cuda", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in truth.parameters():  # diffusers leaves the packed expert weights uninitialized
            fan_in = p.shape[-2] if p.ndim == 3 else p.shape[-1]
            # bf16-representable weights: both layers hold the same values, only the arithmetic differs.
            p.copy_((torch.randn(p.shape, device="cuda") / math.sqrt(fan_in)).to(torch.bfloat16).float())
    return truth, copy.deepcopy(truth).to(torch.bfloat16)


def layer_selections(torch, layer, hidden_states, unmodulated, temb, capacity: int):
    """The [B, E, C] tokens diffusers' layer picks (its own scores, rounded to its dtype before top-k)."""
    slen = hidden_states.shape[1]
    logits = layer.gate(torch.cat([temb.unsqueeze(1).expand(-1, slen, -1), unmodulated], dim=-1))
    score = torch.sigmoid(logits.float()) if layer.use_sigmoid else torch.softmax(logits.float(), dim=-1)
    return torch.topk(score.to(logits.dtype).transpose(1, 2), k=capacity, dim=-1).indices


def routing_agreement(torch, actual, expected) -> float:
    """Share of the expected (row, expert, token) selections that `actual` makes too."""
    slen = int(max(actual.max(), expected.max())) + 1
    hit_a = torch.zeros(*expected.shape[:2], slen, device=expected.device, dtype=torch.bool)
    hit_e = torch.zeros_like(hit_a)
    hit_a.scatter_(-1, actual, True)
    hit_e.scatter_(-1, expected, True)
    return ((hit_a & hit_e).sum() / hit_e.sum()).item()


def plugin_layer(torch, k: Kernels, layer, hidden_states, unmodulated, temb, capacity: int):
    """The exported graph's MoE layer with the two kernels: gate, router, gather, batched GEMMs, shared, combine."""
    import torch.nn.functional as F

    bsz, slen, hidden = hidden_states.shape
    experts = layer.num_experts
    router_input = torch.cat([temb.unsqueeze(1).expand(-1, slen, -1), unmodulated], dim=-1)
    logits = layer.gate(router_input)
    indices, gating = k.router(torch, logits, capacity, layer.use_sigmoid, layer.route_scale)
    offsets = (torch.arange(bsz, device="cuda") * slen).view(1, bsz, 1)
    global_idx = (indices.transpose(0, 1) + offsets).reshape(-1)
    routed = hidden_states.reshape(bsz * slen, hidden).index_select(0, global_idx).view(experts, bsz * capacity, hidden)
    gate_up = torch.bmm(routed, layer.experts.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    expert_out = torch.bmm(F.silu(gate) * up, layer.experts.down_proj).view(experts, bsz, capacity, hidden)
    shared = layer.shared_expert(hidden_states)
    return k.combine(torch, shared, expert_out, indices, gating), indices


def benchmark(torch, k: Kernels, args, failures):
    import torch.nn.functional as F

    bsz, slen, experts, hidden = args.batch, args.bench_tokens, args.experts, args.hidden
    capacity = k.capacity(2, 1, slen, experts)
    rows = []
    dt = torch.bfloat16
    logits = torch.randn(bsz, slen, experts, device="cuda", dtype=dt)
    rows.append(("router (bf16 logits)", time_ms(torch, lambda: torch_router_ops(torch, logits, capacity, False, 2.5), args.iters),
                 time_ms(torch, lambda: k.router(torch, logits, capacity, False, 2.5), args.iters)))
    indices, gating = k.router(torch, logits, capacity, False, 2.5)
    shared = torch.randn(bsz, slen, hidden, device="cuda", dtype=dt)
    expert = torch.randn(experts, bsz, capacity, hidden, device="cuda", dtype=dt)
    flat_idx = (indices + torch.arange(bsz, device="cuda").view(bsz, 1, 1) * slen).transpose(0, 1).reshape(-1)
    flat_g = gating.transpose(0, 1).reshape(-1)
    routed = expert.reshape(-1, hidden)
    shared_flat = shared.reshape(-1, hidden)
    rows.append(("combine (bf16)", time_ms(torch, lambda: torch_combine_ops(torch, shared_flat, routed, flat_idx, flat_g), args.iters),
                 time_ms(torch, lambda: k.combine(torch, shared, expert, indices, gating), args.iters)))

    layer_speedup = None
    if not args.skip_layer:
        grouped = hasattr(F, "grouped_mm")
        if not grouped:
            print("  torch has no F.grouped_mm: diffusers' layer runs its per-expert loop instead")
        layers = make_layers(torch, args, grouped)
        if layers is not None:
            truth, layer = layers
            x = torch.randn(bsz, slen, hidden, device="cuda", dtype=dt)
            x_unmod = torch.randn(bsz, slen, hidden, device="cuda", dtype=dt)
            temb = torch.randn(bsz, hidden, device="cuda", dtype=dt)
            with torch.no_grad():
                # The truth: diffusers' layer in float32 on the same (bf16) inputs and weights. Low-precision error
                # is dominated by routing flips, so both bf16 layers are judged against it, not against each other.
                inputs32 = (x.float(), x_unmod.float(), temb.float())
                expected = truth(*inputs32).float()
                expected_idx = layer_selections(torch, truth, *inputs32, capacity)
                diffusers_bf16 = layer(x, x_unmod, temb).float()
                diffusers_idx = layer_selections(torch, layer, x, x_unmod, temb, capacity)
                got, got_idx = plugin_layer(torch, k, layer, x, x_unmod, temb, capacity)
                torch.cuda.synchronize()
                norm = expected.norm()
                rel_diffusers = ((diffusers_bf16 - expected).norm() / norm).item()
                rel_kernels = ((got.float() - expected).norm() / norm).item()
                agree_diffusers = routing_agreement(torch, diffusers_idx, expected_idx)
                agree_kernels = routing_agreement(torch, got_idx, expected_idx)
                print("  whole layer vs diffusers float32 (relative L2 error, routing agreement):")
                print(f"    diffusers bf16 layer   {rel_diffusers:.3e}  {100 * agree_diffusers:.2f}%")
                print(f"    kernels' bf16 layer    {rel_kernels:.3e}  {100 * agree_kernels:.2f}%")
                if not math.isfinite(rel_kernels) or rel_kernels > rel_diffusers:
                    failures.append("whole layer worse than diffusers bf16 against float32")
                t_ref = time_ms(torch, lambda: layer(x, x_unmod, temb), args.iters)
                t_ours = time_ms(torch, lambda: plugin_layer(torch, k, layer, x, x_unmod, temb, capacity), args.iters)
            label = f"MoE layer (B={bsz}, S={slen}, {'grouped_mm' if grouped else 'loop'})"
            rows.append((label, t_ref, t_ours))
            layer_speedup = t_ref / t_ours

    print(f"\n  {'op':44s} {'PyTorch ms':>11s} {'kernels ms':>11s} {'speedup':>8s}")
    for name, t_ref, t_ours in rows:
        print(f"  {name:44s} {t_ref:11.3f} {t_ours:11.3f} {t_ref / t_ours:7.2f}x")
    if layer_speedup is not None:
        verdict = "MET" if layer_speedup >= 1.5 else "NOT MET"
        print(f"\n  goal (whole layer >= 1.5x diffusers' eager layer): {verdict} ({layer_speedup:.2f}x)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_selftest:
        return cpu_selftest()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine (or use --cpu-selftest)")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  library {args.lib}")
    k = Kernels(args.lib)
    failures: list[str] = []
    print("\ncorrectness (poisoned outputs, fresh random inputs, run twice):")
    for slen in args.tokens:
        for cf in args.capacity_factors:
            for dtype in args.dtypes:
                check_router(torch, k, args.batch, slen, args.experts, cf, False, dtype, failures)
            check_router(torch, k, args.batch, slen, args.experts, cf, True, "float32", failures)
            for dtype in args.dtypes:
                check_combine(torch, k, args.batch, slen, args.experts, args.hidden, cf, dtype, failures)
    print("\ntiming (median of CUDA-event timings):")
    benchmark(torch, k, args, failures)
    print("\nRESULT:", "all checks passed" if not failures else f"{len(failures)} FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
