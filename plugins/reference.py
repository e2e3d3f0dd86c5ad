"""NumPy CPU reference of the two `nucleus` plugin ops (spec: docs/contract.md, plugins/README.md).

The CUDA kernels follow these functions operation by operation, in the same float32 arithmetic and the same
summation orders, so on the CPU they reproduce diffusers' NucleusMoELayer (torch's CPU scatter_add adds in source
order, which is ascending expert order). tests/test_plugins.py checks them against diffusers; plugins/gpu_check.py
checks the kernels against the PyTorch ops at the real sizes.

Only numpy (and ml_dtypes for bfloat16 arrays) is needed; importable as a plain file (`python plugins/reference.py`
runs a small self-check).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np


def _load_contract() -> ModuleType:
    """The bundle contract (runtime/nucleus_runtime/contract.py: standard library only), loaded by path so this file
    works where the project is not installed (the GPU check machine)."""
    path = Path(__file__).resolve().parents[1] / "runtime" / "nucleus_runtime" / "contract.py"
    spec = importlib.util.spec_from_file_location("nucleus_contract", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


contract = _load_contract()

SCORE_FUNCTIONS = contract.SCORE_FUNCTIONS
GATING_EPS = np.float32(contract.GATING_EPS)


def router_scores(router_logits: np.ndarray, score_function: str) -> np.ndarray:
    """Per-token scores over the experts in float32: softmax (exp(x - max) / sum) or sigmoid."""
    x = np.asarray(router_logits).astype(np.float32)
    if score_function == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)
    if score_function == "sigmoid":
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)
    raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {score_function!r}")


def expert_choice_router(
    router_logits: np.ndarray,
    capacity_numerator: int,
    capacity_denominator: int,
    score_function: str = "softmax",
    route_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """ExpertChoiceRouter: router_logits [B, S, E] -> (token_indices int64 [B, E, C], gating float32 [B, E, C]).

    Per batch row and expert: the C tokens with the highest score, descending (ties: lower token first); gating is
    score / (sum of the scores of every (expert, slot) that chose the same token, in ascending expert order, + 1e-12)
    times route_scale.
    """
    logits = np.asarray(router_logits)
    if logits.ndim != 3:
        raise ValueError(f"router_logits must be [B, S, E], got shape {logits.shape}")
    batch, tokens, experts = logits.shape
    capacity = contract.capacity(capacity_numerator, capacity_denominator, tokens, experts)
    if not contract.capacity_fits(capacity, tokens):
        raise ValueError(f"capacity {capacity} exceeds the {tokens} tokens of a row")
    affinity = router_scores(logits, score_function).transpose(0, 2, 1)  # [B, E, S]
    # Stable sort of the negated scores: descending score, ties by ascending token.
    order = np.argsort(-affinity, axis=-1, kind="stable")[..., :capacity]
    token_indices = order.astype(np.int64)
    values = np.take_along_axis(affinity, token_indices, axis=-1)  # [B, E, C]

    dense = np.zeros((batch, tokens, experts), dtype=np.float32)
    rows = np.arange(batch)[:, None, None]
    cols = np.arange(experts)[None, :, None]
    dense[rows, token_indices, cols] = values
    sums = np.zeros((batch, tokens), dtype=np.float32)
    for e in range(experts):  # ascending expert order, one float32 addition at a time
        sums += dense[:, :, e]
    chosen_sums = np.take_along_axis(sums[:, None, :], token_indices, axis=-1)
    gating = values / (chosen_sums + GATING_EPS)
    gating = (gating * np.float32(route_scale)).astype(np.float32)
    return token_indices, gating


def moe_combine(
    shared_output: np.ndarray, expert_output: np.ndarray, token_indices: np.ndarray, gating: np.ndarray
) -> np.ndarray:
    """MoECombine: shared_output [B, S, H] + gated expert_output [E, B, C, H] scattered by token_indices [B, E, C].

    Each contribution is float32(expert_output) * gating rounded to the compute dtype; the contributions are added
    to float32(shared_output) in float32, in ascending expert order, and the sum is rounded to the compute dtype
    once -- bit for bit what torch's CPU scatter_add gives diffusers' layer.
    """
    shared = np.asarray(shared_output)
    expert = np.asarray(expert_output)
    dtype = shared.dtype
    batch, tokens, hidden = shared.shape
    experts = expert.shape[0]
    if expert.shape[1] != batch or expert.shape[3] != hidden or token_indices.shape[:2] != (batch, experts):
        raise ValueError(
            f"shape mismatch: shared {shared.shape}, expert {expert.shape}, token_indices {token_indices.shape}"
        )
    contribution = (expert.astype(np.float32) * gating.transpose(1, 0, 2)[..., None].astype(np.float32)).astype(dtype)
    acc = shared.astype(np.float32)
    for e in range(experts):
        for b in range(batch):
            idx = token_indices[b, e]
            if len(np.unique(idx)) != len(idx):
                raise ValueError(f"token_indices[{b}, {e}] repeats a token")
            acc[b, idx] += contribution[e, b].astype(np.float32)
    out = acc.astype(dtype)
    return out


def dispatch(hidden_states: np.ndarray, token_indices: np.ndarray) -> np.ndarray:
    """The plain Gather between the ops: hidden [B, S, H] -> routed input [E, B*C, H] (expert-major, batch, slot)."""
    batch, tokens, hidden = hidden_states.shape
    global_indices = token_indices.transpose(1, 0, 2) + (np.arange(batch) * tokens)[None, :, None]  # [E, B, C]
    return hidden_states.reshape(batch * tokens, hidden)[global_indices.reshape(token_indices.shape[1], -1)]


def expert_swiglu(routed_input: np.ndarray, gate_up_proj: np.ndarray, down_proj: np.ndarray) -> np.ndarray:
    """Batched SwiGLU experts: [E, N, H] x gate_up [E, H, 2I] -> silu(gate) * up -> x down [E, I, H] -> [E, N, H]."""
    gate_up = np.matmul(routed_input.astype(np.float32), gate_up_proj.astype(np.float32))
    gate, up = np.split(gate_up, 2, axis=-1)
    act = gate / (np.float32(1.0) + np.exp(-gate)) * up
    return np.matmul(act, down_proj.astype(np.float32)).astype(np.float32)


def moe_layer(
    hidden_states: np.ndarray,
    router_logits: np.ndarray,
    shared_output: np.ndarray,
    gate_up_proj: np.ndarray,
    down_proj: np.ndarray,
    capacity_numerator: int,
    capacity_denominator: int,
    score_function: str,
    route_scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router -> gather -> experts -> combine, as the exported graph runs it. Returns (output, indices, gating)."""
    indices, gating = expert_choice_router(
        router_logits, capacity_numerator, capacity_denominator, score_function, route_scale
    )
    batch = hidden_states.shape[0]
    experts, capacity = indices.shape[1], indices.shape[2]
    routed = expert_swiglu(dispatch(hidden_states, indices), gate_up_proj, down_proj)
    expert_output = routed.reshape(experts, batch, capacity, -1).astype(shared_output.dtype)
    return moe_combine(shared_output, expert_output, indices, gating), indices, gating


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 64, 8)).astype(np.float32)
    idx, gate = expert_choice_router(logits, 2, 1, "softmax", 2.5)
    print("token_indices", idx.shape, "gating", gate.shape, "C =", idx.shape[-1])
    shared = rng.standard_normal((2, 64, 16)).astype(np.float32)
    expert = rng.standard_normal((8, 2, idx.shape[-1], 16)).astype(np.float32)
    print("combine", moe_combine(shared, expert, idx, gate).shape)
