"""Parity segment by segment: the reference one block at a time, the graph one segment at a time, so the report of
the 17B model fits in about the memory of its largest block.

The loop is segment-outer, batch-inner. For each segment of the denoiser (consecutive blocks [first, last)):
1. diffusers' blocks of the segment run on every batch, each block loaded from the safetensors, run and freed in
   turn (model.reference.BlockwiseReference); per MoE block the router's input, scores and selections are kept for
   this segment only; then the same for diffusers in bf16 when the report has a baseline;
2. the graph segment's end-to-end variant (router selections exposed) runs in one ONNX Runtime session on every
   batch, carrying its own state from the previous segment; the session is freed;
3. its forced variant (the reference's selections forced, its own choice and router inputs exposed) runs the same
   way, carrying the forced run's state;
4. the segment's flips are classified (score margins against the rounding bound, with the measured router-input
   error) and the router inputs dropped.
The segments are exact cuts of the graph (rewrites/segments.py) and the reference's parts are diffusers' own modules
in the order of its forward, so the result is the report of the whole graph against the whole model; one segment and
a model in memory is the classic check (parity.check.check_parity runs through here too).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from nucleus_runtime.contract import SAMPLE, TEXT_KV

from nucleus_export.log import track
from nucleus_export.model.config import ModelConfig
from nucleus_export.moe.expert_choice import reference_scores, reference_selection, score_bounds
from nucleus_export.parity.cases import ParityCase
from nucleus_export.parity.compare import BASELINE_LABEL, GRAPH_LABEL, CaseResult, Comparison, case_image_scores
from nucleus_export.parity.images import ImageDecoder
from nucleus_export.parity.routing import LayerRouting, agreement, classify_flips
from nucleus_export.parity.sessions import cpu_session
from nucleus_export.rewrites.forced_routing import RoutingNames, router_nodes, with_forced_routing, with_router_outputs
from nucleus_export.rewrites.segments import Segment

if TYPE_CHECKING:
    from nucleus_export.model.reference import BlockInputs, BlockwiseReference

logger = logging.getLogger("nucleus_export")


# ---- graph side --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SegmentGraphs:
    """One denoiser segment's two parity variants.

    Attributes:
        segment: its blocks and the tensors it takes from / hands to the other segments.
        free: the segment with its router selections as extra outputs (`free_routing`, in block order).
        forced: the segment whose routers take `forced_routing.forced_inputs` (in block order).
        moe_layers: global indices of its MoE blocks, in order.
        sliced_text_kv: whether its `text_kv` input is the slice of its blocks (a cut) or all blocks (a whole graph).
    """

    segment: Segment
    free: onnx.ModelProto | Callable[[], onnx.ModelProto]
    free_routing: list[str]
    forced: onnx.ModelProto | Callable[[], onnx.ModelProto]
    forced_routing: RoutingNames
    moe_layers: list[int]
    sliced_text_kv: bool = True

    def model(self, which: str) -> onnx.ModelProto:
        m = self.free if which == "free" else self.forced
        return m() if callable(m) else m


def parity_segments(
    pieces: list[tuple[onnx.ModelProto, Segment]], config: ModelConfig, rewrite: Callable[[onnx.ModelProto], onnx.ModelProto],
    sliced_text_kv: bool = True,
) -> list[SegmentGraphs]:
    """The parity variants of denoiser pieces (split_segments's output, or one whole graph), `rewrite` applied after
    the parity rewrites (as parity.check.variants_of does). Variants are built when their session opens."""
    out = []
    moe = iter(config.moe_layers)
    for piece, seg in pieces:
        routers = len(router_nodes(piece))
        layers = [next(moe) for _ in range(routers)]
        _, free_names = with_router_outputs(piece)
        forced_names = _forced_names(piece)

        def free(piece=piece) -> onnx.ModelProto:
            return rewrite(with_router_outputs(piece)[0])

        def forced(piece=piece) -> onnx.ModelProto:
            return rewrite(with_forced_routing(piece)[0])

        out.append(SegmentGraphs(seg, free, free_names, forced, forced_names, layers, sliced_text_kv))
    return out


def _forced_names(piece: onnx.ModelProto) -> RoutingNames:
    """with_forced_routing's names without keeping its copy of the graph."""
    _, names = with_forced_routing(_without_initializers(piece))
    return names


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    del light.graph.initializer[:]
    return light


def _run_segment(session: Any, seg: SegmentGraphs, state: dict[str, np.ndarray], text_kv: np.ndarray,
                 extra_inputs: dict[str, np.ndarray], extra_outputs: list[str]) -> list[np.ndarray]:
    first, last = seg.segment.blocks
    feeds = {}
    for name in seg.segment.inputs:
        feeds[name] = text_kv[first:last] if name == TEXT_KV and seg.sliced_text_kv else (text_kv if name == TEXT_KV else state[name])
    outputs = list(seg.segment.outputs)
    values = session.run([*outputs, *extra_outputs], {**feeds, **extra_inputs})
    state.update(zip(outputs, values[: len(outputs)]))
    return values[len(outputs):]


# ---- reference side ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _BlockTrace:
    selections: np.ndarray  # [B, E, C]
    scores: np.ndarray | None  # [B, S, E]
    gate_input: np.ndarray | None  # [B, S, 2H]


def _run_reference_block(ref: BlockwiseReference, idx: int, state: BlockInputs, config: ModelConfig,
                         details: bool) -> tuple[BlockInputs, _BlockTrace | None]:
    """One loaded block on one batch, with the router's input and logits captured by a hook for this call only."""
    import torch

    block = ref.block_module(idx)
    if not config.is_moe(idx):
        return ref.run_block(idx, state), None
    gates: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = block.img_mlp.gate.register_forward_hook(lambda _m, args, out: gates.append((args[0].detach(), out.detach())))
    try:
        state = ref.run_block(idx, state)
    finally:
        hook.remove()
    gate_input, logits = gates[0]
    with torch.no_grad():
        score = reference_scores(logits, config.score_function)
        selection = reference_selection(score, config.capacity(idx, logits.shape[1]))
        trace = _BlockTrace(
            selection,
            score.float().cpu().numpy() if details else None,
            gate_input.float().cpu().numpy() if details else None,
        )
    return state, trace


def _text_kv_of_block(ref: BlockwiseReference, idx: int, state: BlockInputs, config: ModelConfig) -> np.ndarray:
    """Block `idx`'s text K/V [2, B, T, Hkv, Dh] exactly as diffusers' TextKVCache hook computes them."""
    import torch
    from diffusers.models.transformers.transformer_nucleusmoe_image import _apply_rotary_emb_nucleus

    block = ref.block_module(idx)
    with torch.no_grad():
        context = block.encoder_proj(state.encoder_hidden_states)
        key = block.attn.add_k_proj(context).unflatten(-1, (config.kv_heads, -1))
        value = block.attn.add_v_proj(context).unflatten(-1, (config.kv_heads, -1))
        key = _apply_rotary_emb_nucleus(block.attn.norm_added_k(key), state.image_rotary_emb[1], use_real=False)
        return torch.stack([key, value]).float().cpu().numpy()


def _prologue(ref: BlockwiseReference, case: ParityCase) -> BlockInputs:
    return ref.prologue(
        ref.tensor(case.hidden_states), [(1, *case.grid)] * case.batch, ref.tensor(case.encoder_hidden_states),
        ref.tensor(case.mask), ref.tensor(case.timestep),
    )


@dataclasses.dataclass
class TruthTrace:
    """What the float32 reference gave on one batch, kept when the same cases are checked against many graphs (FP8
    probes): the sample, the selections per MoE block, the text K/V. Without scores and router inputs, flips are
    counted but not classified."""

    sample: np.ndarray
    selections: dict[int, np.ndarray]
    text_kv: np.ndarray


class TruthCache:
    """The float32 reference's traces by batch name (unique within one fixed case list): the reference then runs
    once for all probes of an FP8 selection."""

    def __init__(self) -> None:
        self.traces: dict[str, TruthTrace] = {}


# ---- comparisons that pool over pieces ---------------------------------------------------------------------------


class _Accumulated:
    """Comparison.of of a concatenation, accumulated piece by piece (the text K/V of one block at a time)."""

    def __init__(self) -> None:
        self.sq_diff = self.sq_e = self.sq_a = self.dot = self.max_abs = 0.0

    def add(self, actual: np.ndarray, expected: np.ndarray) -> None:
        a, e = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
        d = a - e
        self.sq_diff += float(d @ d)
        self.sq_e += float(e @ e)
        self.sq_a += float(a @ a)
        self.dot += float(a @ e)
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)

    def comparison(self):
        norm_e, norm_a = float(np.sqrt(self.sq_e)), float(np.sqrt(self.sq_a))
        return Comparison(self.max_abs, float(np.sqrt(self.sq_diff) / max(norm_e, 1e-30)),
                          float(self.dot / max(norm_a * norm_e, 1e-30)), norm_a, norm_e)


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    case: ParityCase
    rows: list[tuple[ParityCase, slice]]
    text_kv: np.ndarray  # the graph's, [L, 2, B, T, Hkv, Dh]
    truth: BlockInputs | None = None
    low: BlockInputs | None = None
    free: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    forced: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    selections: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # reference, per MoE block
    low_selections: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    routing: dict[int, list[LayerRouting]] = dataclasses.field(default_factory=dict)  # per block, per case
    text_kv_parts: list[_Accumulated] = dataclasses.field(default_factory=list)  # per case
    expected_text_kv: list[np.ndarray] = dataclasses.field(default_factory=list)  # per block (for the cache)


def _initial_state(case: ParityCase, config: ModelConfig, text_kv: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v for k, v in case.denoiser_inputs(config, text_kv).items() if k != TEXT_KV}


def run_segmented_parity(
    config: ModelConfig,
    batches: list[tuple[ParityCase, list[tuple[ParityCase, slice]]]],
    text_kv_session: Callable[[], Any],
    segments: list[SegmentGraphs],
    open_session: Callable[[onnx.ModelProto], Any],
    truth: BlockwiseReference,
    low: BlockwiseReference | None = None,
    cache: TruthCache | None = None,
    progress: bool = True,
    open_decoder: Callable[[], ImageDecoder] | None = None,
) -> list[Any]:
    """The parity loop (module docstring); returns parity.compare.CaseResult per case, in case order.

    Args:
        config: the model.
        batches: parity.cases.batch_by_resolution's output.
        text_kv_session: opens the text_kv graph's session.
        segments: the denoiser's pieces, in order.
        open_session: an ONNX Runtime session of a graph variant (freed by dropping it).
        truth: diffusers in float32 (streamed or a whole model).
        low: diffusers in bf16 for the baseline, or None.
        cache: float32 traces to reuse (filled on first use): the reference then runs only once per case list.
        progress: log per-segment progress (`track`).
        open_decoder: opens the image decoder (parity.images) that scores each case's decoded x0 estimate, after
            the last segment has freed its memory; None: latents only.
    """
    session = text_kv_session()
    state = [_Batch(case, rows, session.run(None, case.text_kv_inputs(config))[0]) for case, rows in batches]
    del session
    cached = cache is not None and all(b.case.name in cache.traces for b in state)
    for b in state:
        b.text_kv_parts = [_Accumulated() for _ in b.rows]
        b.free = _initial_state(b.case, config, b.text_kv)
        b.forced = dict(b.free)
        if not cached:
            b.truth = _prologue(truth, b.case)
        if low is not None:
            b.low = _prologue(low, b.case)
    details = not cached
    steps: Iterator[SegmentGraphs] = track(segments, "parity, segment by segment") if progress and len(segments) > 1 else iter(segments)
    started = time.perf_counter()
    # What each batch's graph state must keep after segment k: what later segments read (the rest is dropped, or the
    # residual streams of every block would pile up: ~0.1 GB per block and batch row at 1024x1024).
    later = [set().union(*(s.segment.inputs for s in segments[k + 1:]), {SAMPLE}) for k in range(len(segments))]
    for number, seg in enumerate(steps, 1):
        first, last = seg.segment.blocks
        if progress and len(segments) > 1:
            # One line per segment, so a piped log (CI, `build ... | tee`) shows where a long report is.
            logger.info("parity segment %d/%d (blocks %d..%d), %.0f s so far, peak RSS %.2f GB", number, len(segments),
                        first, last - 1, time.perf_counter() - started, _peak_rss() / 1e9)
        traces: dict[int, list[_BlockTrace]] = {}
        gate_weights: dict[int, np.ndarray] = {}
        # 1. the reference's blocks, each loaded once for all batches
        logger.debug("segment %d..%d: diffusers float32", first, last - 1)
        for idx in range(first, last):
            if cached:
                for b in state:
                    trace = cache.traces[b.case.name]
                    if config.is_moe(idx):
                        b.selections[idx] = trace.selections[idx]
                    _add_text_kv(b, idx, trace.text_kv[idx])
                continue
            truth.load_block(idx)
            try:
                if config.is_moe(idx):
                    gate_weights[idx] = truth.block_module(idx).img_mlp.gate.weight.detach().float().cpu().numpy()
                for b in state:
                    expected_kv = _text_kv_of_block(truth, idx, b.truth, config)
                    _add_text_kv(b, idx, expected_kv)
                    b.expected_text_kv.append(expected_kv)
                    b.truth, trace = _run_reference_block(truth, idx, b.truth, config, details)
                    if trace is not None:
                        b.selections[idx] = trace.selections
                        traces.setdefault(idx, []).append(trace)
            finally:
                truth.release_block(idx)
        if low is not None:
            logger.debug("segment %d..%d: diffusers bf16", first, last - 1)
            for idx in range(first, last):
                low.load_block(idx)
                try:
                    for b in state:
                        b.low, trace = _run_reference_block(low, idx, b.low, config, False)
                        if trace is not None:
                            b.low_selections[idx] = trace.selections
                finally:
                    low.release_block(idx)
        _release_memory()
        # 2. the graph end to end
        logger.debug("segment %d..%d: graph end to end", first, last - 1)
        session = open_session(seg.model("free"))
        for b in state:
            own = _run_segment(session, seg, b.free, b.text_kv, {}, seg.free_routing)
            for k, idx in enumerate(seg.moe_layers):
                b.free[f"__selections.{idx}"] = own[k]
        del session
        _release_memory()
        # 3. the graph with the reference's routing forced
        logger.debug("segment %d..%d: graph with routing forced", first, last - 1)
        names = seg.forced_routing
        session = open_session(seg.model("forced"))
        forced_out: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
        for b in state:
            forced_inputs = {n: b.selections[idx] for n, idx in zip(names.forced_inputs, seg.moe_layers)}
            extra = _run_segment(session, seg, b.forced, b.text_kv, forced_inputs, [*names.selections, *names.gate_inputs])
            n = len(names.selections)
            forced_out.append((extra[:n], extra[n:]))
        del session
        _release_memory()
        # 4. routing of the segment's MoE blocks, per case
        for bi, b in enumerate(state):
            own_selections, graph_inputs = forced_out[bi]
            for k, idx in enumerate(seg.moe_layers):
                expected = b.selections[idx]
                if details:
                    t = traces[idx][bi]
                    bounds = score_bounds(t.gate_input, gate_weights[idx], t.scores, config.score_function,
                                          input_error=graph_inputs[k] - t.gate_input)
                per_case = []
                for _case, rows in b.rows:
                    own, exp = own_selections[k][rows], expected[rows]
                    if details:
                        flips, near, margin, ratio = classify_flips(own, exp, t.scores[rows], bounds[rows])
                    else:
                        flips = _dropped(own, exp)
                        near, margin, ratio = flips, 0.0, 0.0  # not classified without the reference's scores
                    per_case.append(LayerRouting(agreement(b.free[f"__selections.{idx}"][rows], exp), agreement(own, exp),
                                                 flips, near, margin, ratio))
                b.routing[idx] = per_case
        del traces, forced_out
        for b in state:
            for graph_state in (b.free, b.forced):
                for name in [n for n in graph_state if n not in later[number - 1] and not n.startswith("__selections.")]:
                    del graph_state[name]
    # The output projection and the results.
    decode = open_decoder() if open_decoder is not None else None
    results = []
    for batch_number, b in enumerate(state, 1):
        if cached:
            sample = cache.traces[b.case.name].sample
        else:
            sample = truth.epilogue(b.truth).float().cpu().numpy()
            if cache is not None:
                cache.traces[b.case.name] = TruthTrace(sample, dict(b.selections), np.stack(b.expected_text_kv))
        base = low.epilogue(b.low).float().cpu().numpy() if low is not None else None
        images = None
        if decode is not None:
            if progress:
                # A 1024x1024 decode takes about a minute on the CPU: one line per batch in piped logs too.
                logger.info("decoding x0 estimates, batch %d/%d (%d images per side)", batch_number, len(state), b.case.batch)
            sides = {GRAPH_LABEL: b.free[SAMPLE], **({} if base is None else {BASELINE_LABEL: base})}
            images = case_image_scores(decode, b.case, [rows for _c, rows in b.rows], sample, sides)
        for c, (case, rows) in enumerate(b.rows):
            results.append(
                CaseResult(
                    case.name,
                    b.text_kv_parts[c].comparison(),
                    Comparison.of(b.free[SAMPLE][rows], sample[rows]),
                    Comparison.of(b.forced[SAMPLE][rows], sample[rows]),
                    {str(idx): b.routing[idx][c] for idx in config.moe_layers},
                    None if base is None else Comparison.of(base[rows], sample[rows]),
                    None if low is None else {
                        str(idx): agreement(b.low_selections[idx][rows], b.selections[idx][rows]) for idx in config.moe_layers
                    },
                    None if images is None else images[c],
                )
            )
    return results


def _release_memory() -> None:
    """Collect, and hand freed heap back to the system (glibc keeps it otherwise, and the next session's peak adds)."""
    gc.collect()
    import ctypes

    # ctypes.pythonapi is the interpreter's own handle on what the process has loaded already (glibc's malloc_trim
    # among it): no library is opened or loaded here, so there is nothing to verify. Other C libraries have no
    # malloc_trim: nothing to do.
    trim = getattr(ctypes.pythonapi, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _add_text_kv(b: _Batch, idx: int, expected: np.ndarray) -> None:
    for c, (_case, rows) in enumerate(b.rows):
        b.text_kv_parts[c].add(b.text_kv[idx][:, rows].astype(np.float32), expected[:, rows])


def _dropped(own: np.ndarray, expected: np.ndarray) -> int:
    return sum(
        len(np.setdiff1d(expected[r, e], own[r, e], assume_unique=True))
        for r in range(expected.shape[0])
        for e in range(expected.shape[1])
    )


def session_opener(directory: Path, threads: int | None = None) -> Callable[[onnx.ModelProto], Any]:
    """ONNX Runtime CPU sessions of graph variants saved next to the bundle's graphs (relative external data
    resolves; weights left external stay in the bundle's files)."""
    return lambda model: cpu_session(model, Path(directory), threads)
