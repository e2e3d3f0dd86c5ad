"""How each GEMM computes in an FP8 build (W8A8, FP8 weights only, or bf16), chosen by measurement.

What was measured (docs/fp8.md): FP8's excess error is E4M3 arithmetic, weight and activation rounding in about
equal parts, not routing alone: with the reference's routing forced, the tiny model's FP8 graph is 3.7x the bf16
graph's error. Each GEMM group's share adds up (the sum of one-group-at-a-time excesses matches the whole within a few
percent), so the selection is a budget problem:

1. probes (the denoiser exported at a small resolution, MoE lowered, bf16 emulated, against diffusers float32 on
   cases of their own seed, so the build's quality report judges on cases the selection never saw): the bf16 graph,
   the all-W8A8 graph, and each (block, kind) group of GEMMs alone in W8A8 and alone with FP8 weights only;
2. a group's cost in a mode is its increase of the squared end-to-end error, predicted from two measurements: the
   squared error it adds with routing forced (arithmetic), plus the routing agreement it loses priced at what a lost
   selection cost in the all-W8A8 probe (flips; routers are discrete, so a GEMM upstream of a router costs more than
   the same noise after the last one);
3. the budget is what the target allows over the bf16 graph, (target^2 - 1) x bf16's squared error. Groups are
   upgraded greedily, most benefit per cost first: bf16 -> FP8 weights by weight bytes saved (FP8's main gain for
   an MoE: expert weights are 96% of the real model's GEMM bytes), then FP8 weights -> W8A8 by GEMM FLOPs;
4. the chosen graph is probed; while its error is over the target on any probe case set, the budget shrinks by the
   measured overshoot.
The modes are written into the recipe (fp8_scales.json: `modes`, the measurements under calibration["sensitivity"]), so
a rebuild from the stored recipe is reproducible without probing again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any


from nucleus_runtime.bundle import LoweringRecord
from nucleus_runtime.contract import COMBINE_ONEHOT, MOE_NATIVE, GemmMode

from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.log import quiet, track
from nucleus_export.parity.streamed import TruthCache
from nucleus_export.quant.gemms import GemmGroup, fp8_share, gemm_groups

if TYPE_CHECKING:
    import torch

    from nucleus_export.model.checkpoint import Checkpoint

logger = logging.getLogger("nucleus_export")

# FP8 may cost this much over bf16 in pooled relative error (issue 13).
FP8_ERROR_TARGET = 1.25
PROBE_RESOLUTION = (512, 512)
# Probe cases are drawn with their own seeds: the quality report (seed 0) then judges the choice on unseen inputs.
# Most of the bf16 graph's error (the target's unit) is near-tie routing flips, so one small case set measures the
# ratio coarsely (measured: 1.16x on the probes, 1.41x on held-out cases of the same model). The chosen graph must
# meet the target on every probe set separately, not only pooled: a choice that holds on three independent samples
# holds on a fourth far more often.
PROBE_CASE_SEEDS = (1, 2, 3)
# Selection rounds: each shrinks the budget by the measured overshoot of the previous choice, and by at least this
# factor, so a small overshoot that routing flips keep alive still ends within the rounds.
MAX_ROUNDS = 6
MIN_SHRINK = 0.8


@dataclasses.dataclass
class Probe:
    """One measured graph, pooled over the probe cases against diffusers float32."""

    relative_error: float  # end to end
    forced_relative_error: float  # with the reference's routing forced: arithmetic only
    routing_agreement: float
    per_case_set: list[float]  # end-to-end relative error on each probe case set (PROBE_CASE_SEEDS)


@dataclasses.dataclass
class GroupCost:
    """A group's probes alone in each FP8 mode and the predicted increase of the squared error (cost)."""

    group: str
    probes: dict[GemmMode, Probe]  # W8A8 / FP8 weights only -> probe with only this group in that mode
    cost: dict[GemmMode, float]


@dataclasses.dataclass
class Sensitivity:
    """What the selection measured and chose (stored in fp8_scales.json)."""

    bf16: Probe
    all_fp8: Probe
    flip_price: float  # squared error per unit of routing agreement lost, from the all-W8A8 probe
    groups: list[GroupCost]
    modes: dict[str, GemmMode]  # group -> its mode
    chosen: Probe
    ratios: list[float]  # chosen / bf16 on each probe case set
    rounds: int
    target: float
    met: bool
    share: dict[str, float]  # Fp8Share of this model

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def summary(self) -> str:
        by_mode = {m: [g for g, v in self.modes.items() if v == m] for m in (GemmMode.FP8_WEIGHTS, GemmMode.COMPUTE)}
        return (
            f"FP8 sensitivity: rel err {self.chosen.relative_error:.3e} vs bf16's {self.bf16.relative_error:.3e}, "
            f"{' / '.join(f'{r:.2f}' for r in self.ratios)} x on {len(self.ratios)} probe case sets "
            f"(target {self.target:g}x on each: {'met' if self.met else 'NOT met'}; all-W8A8 "
            f"{self.all_fp8.relative_error:.3e}); FP8 weights only: {', '.join(by_mode[GemmMode.FP8_WEIGHTS]) or 'none'}; "
            f"kept in bf16: {', '.join(by_mode[GemmMode.COMPUTE]) or 'none'}; "
            f"{100 * self.share['weight_bytes']:.0f}% of GEMM weight bytes and {100 * self.share['gemm_flops']:.0f}% "
            f"of GEMM FLOPs in FP8"
        )


def apply_modes(recipe: QuantRecipe, groups: list[GemmGroup], modes: dict[str, GemmMode]) -> QuantRecipe:
    """The recipe with every GEMM of each group in its group's mode (the default mode needs no entry)."""
    return recipe.with_modes({p: modes[g.name] for g in groups if modes[g.name] != recipe.default_mode for p in g.gemms})


def choose_modes(groups: list[GemmGroup], costs: dict[str, dict[GemmMode, float]], budget: float) -> dict[str, GemmMode]:
    """Greedy knapsack (module docstring, step 3): every group starts in bf16; bf16 -> FP8 weights upgrades go by
    weight bytes per cost, then FP8 weights -> W8A8 by FLOPs per extra cost, each taken while it fits the budget."""
    modes = {g.name: GemmMode.COMPUTE for g in groups}
    spent = 0.0
    tiny = 1e-9 * budget if budget > 0 else 1e-30  # free upgrades rank first, by benefit

    def upgrade(frm: GemmMode, to: GemmMode, benefit) -> None:
        nonlocal spent
        steps = [(g, max(costs[g.name][to] - costs[g.name].get(frm, 0.0), 0.0)) for g in groups if modes[g.name] == frm]
        for group, extra in sorted(steps, key=lambda s: -benefit(s[0]) / max(s[1], tiny)):
            if spent + extra <= budget:
                modes[group.name], spent = to, spent + extra

    upgrade(GemmMode.COMPUTE, GemmMode.FP8_WEIGHTS, lambda g: g.weight_params)
    upgrade(GemmMode.FP8_WEIGHTS, GemmMode.FP8, lambda g: g.flops_per_token)
    return modes


class _Prober:
    """Exports and measures graphs of one checkpoint at the probe resolution."""

    def __init__(self, checkpoint: Checkpoint, compute: str, reference: Any, workdir: Path, resolution: tuple[int, int]):
        from nucleus_export.export import ExportOptions, build_profiles
        from nucleus_export.parity.cases import make_cases

        self.checkpoint, self.compute, self.reference, self.workdir = checkpoint, compute, reference, workdir
        self.options = {"resolutions": [resolution], "max_text_len": 16}
        profiles = build_profiles(checkpoint.config, ExportOptions(**self.options))
        # diffusers' float32 traces on the probe cases, computed once: every probe checks the same cases, so only the
        # graph under test changes.
        self.truth = TruthCache()
        self.cases = [
            dataclasses.replace(case, name=f"{case.name}/seed{seed}")
            for seed in PROBE_CASE_SEEDS
            for case in make_cases(checkpoint.config, profiles, seed=seed)
        ]

    def __call__(self, scales: QuantRecipe | None) -> Probe:
        from nucleus_export.export import ExportOptions, export_bundle
        from nucleus_export.parity.check import check_parity
        from nucleus_export.parity.compare import Comparison
        from nucleus_export.parity.quality import REPORT_MAX_ROWS, built_segments

        folder = Path(tempfile.mkdtemp(prefix="probe-", dir=self.workdir))
        out = folder / "bundle"
        try:
            with quiet():
                export_bundle(self.checkpoint, out, ExportOptions(GraphPrecision(self.compute, scales), **self.options))
                # Segment by segment and block by block, like the quality report: the real model's probes fit too.
                segments, text_kv, _ = built_segments(out, LoweringRecord(MOE_NATIVE, COMBINE_ONEHOT))
                report = check_parity(self.checkpoint, out, reference=self.reference, cases=self.cases, truth=self.truth,
                                      segments=segments, text_kv=text_kv, max_rows=REPORT_MAX_ROWS)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # an FP8 probe of the real model writes ~17 GB
        pooled = report.pooled["graph"]
        forced = Comparison.pooled([c.forced for c in report.cases])["relative_error"]
        per_set = [
            Comparison.pooled([c.sample for c in report.cases if c.name.endswith(f"/seed{seed}")])["relative_error"]
            for seed in PROBE_CASE_SEEDS
        ]
        return Probe(pooled["relative_error"], forced, pooled["routing_agreement"], per_set)


def select_fp8_modes(
    checkpoint: Checkpoint,
    scales: QuantRecipe,
    compute: str = "bf16",
    reference: torch.nn.Module | None = None,
    target: float = FP8_ERROR_TARGET,
    resolution: tuple[int, int] = PROBE_RESOLUTION,
) -> tuple[QuantRecipe, Sensitivity]:
    """Measure every GEMM group's FP8 cost and choose each group's mode (see module docstring).

    Returns:
        The recipe with each GEMM group's mode chosen (QuantRecipe.modes) and the measurements under
        calibration["sensitivity"], and the measurements.
    """
    # Without a model in memory, diffusers runs block by block from the checkpoint (once: the truth is cached).
    groups = gemm_groups(checkpoint.config)
    all_bf16 = {g.name: GemmMode.COMPUTE for g in groups}
    with tempfile.TemporaryDirectory(prefix="nucleus-fp8-sensitivity-") as tmp:
        probe = _Prober(checkpoint, compute, reference, Path(tmp), resolution)
        bf16, all_fp8 = probe(None), probe(scales)
        arithmetic = bf16.forced_relative_error**2
        flips = max(all_fp8.relative_error**2 - all_fp8.forced_relative_error**2 - (bf16.relative_error**2 - arithmetic), 0.0)
        flip_price = flips / max(bf16.routing_agreement - all_fp8.routing_agreement, 1e-6)
        costs = []
        for group in track(groups, "FP8 sensitivity, one GEMM group at a time"):
            alone = {m: probe(apply_modes(scales, groups, {**all_bf16, group.name: m})) for m in (GemmMode.FP8, GemmMode.FP8_WEIGHTS)}
            cost = {
                m: max(p.forced_relative_error**2 - arithmetic, 0.0) + flip_price * max(bf16.routing_agreement - p.routing_agreement, 0.0)
                for m, p in alone.items()
            }
            costs.append(GroupCost(group.name, alone, cost))
            logger.info("FP8 cost of %s: W8A8 %.2e, FP8 weights only %.2e", group.name, cost[GemmMode.FP8], cost[GemmMode.FP8_WEIGHTS])
        budget = (target**2 - 1) * bf16.relative_error**2
        for rounds in range(1, MAX_ROUNDS + 1):
            modes = choose_modes(groups, {c.group: c.cost for c in costs}, budget)
            chosen = probe(apply_modes(scales, groups, modes))
            ratios = [c / max(b, 1e-30) for c, b in zip(chosen.per_case_set, bf16.per_case_set)]
            logger.info("FP8 selection round %d: %s x bf16 on the probe case sets", rounds, " / ".join(f"{r:.2f}" for r in ratios))
            if max(ratios) <= target:
                break
            budget *= min(MIN_SHRINK, (target**2 - 1) / (max(ratios) ** 2 - 1))
    result = apply_modes(scales, groups, modes)
    share = fp8_share(checkpoint.config, result)
    sensitivity = Sensitivity(
        bf16, all_fp8, flip_price, costs, modes, chosen, ratios, rounds, target, max(ratios) <= target,
        dataclasses.asdict(share),
    )
    calibration = {**scales.calibration, "sensitivity": sensitivity.to_dict()}
    return dataclasses.replace(result, calibration=calibration), sensitivity
