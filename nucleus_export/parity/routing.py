"""Routing agreement and the classification of every disagreement by its score margin (numpy only); the bound a
margin is held to is nucleus_export.moe.expert_choice.score_bounds.

Expert-choice routing picks, per (batch row, expert), the C tokens of highest score. Two correct float32
implementations can disagree where two tokens' scores are closer than their rounding error. The bound on a score's
error, per (token, expert), has three parts, none tuned:
- the gate's own reduction order: logits are dot products of K = 2 * hidden terms, and any two summation orders of
  a float32 dot product differ by at most gamma_K * sum_i |x_i| |w_i|, gamma_K = K u / (1 - K u), u = 2^-24
  (Higham, Accuracy and Stability of Numerical Algorithms, 3.1);
- the gate input's difference between graph and reference (float32 rounding of everything upstream, measured in
  the forced run, where both sides routed alike): sum_i |dx_i| |w_i|;
- the score function in float32 (sigmoid: exp, add, divide, 3 u relative; softmax: exp, a sum of E terms, divide,
  (E + 2) u relative).
Logit bounds go through the score function (softmax: |ds_e| <= s_e (|dl_e| + sum_j s_j |dl_j|); sigmoid:
|ds| <= s (1 - s) |dl|). A flip of a token t against a competitor t' is a near-tie when the reference's score margin
s(t) - s(t') is at most the sum of their bounds: rounding alone can explain it. A wrong gate weight, a wrong score
function or a lost update gives flips far outside the bound.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class LayerRouting:
    """Routing of one MoE block in one case.

    Attributes:
        agreement: share of the reference's (row, expert, token) selections the graph made in its own end-to-end run.
        forced_agreement: the same for the graph's own choice given the reference's routing in every block before.
        flips: selections of the reference the graph's own choice (forced run) dropped.
        near_ties: flips within the rounding bound (see module docstring).
        max_flip_margin: largest reference score margin of a flip to its closest competitor (0 without flips).
        max_margin_ratio: largest margin / bound over the flips (<= 1 for near-ties; 0 without flips).
    """

    agreement: float
    forced_agreement: float
    flips: int
    near_ties: int
    max_flip_margin: float = 0.0
    max_margin_ratio: float = 0.0

    @property
    def decided_flips(self) -> int:
        """Flips that rounding cannot explain."""
        return self.flips - self.near_ties


def agreement(actual: np.ndarray, expected: np.ndarray) -> float:
    """Share of (batch row, expert, token) selections present in both [B, E, C] index sets."""
    if actual.shape != expected.shape:
        return 0.0
    batch, experts, capacity = expected.shape
    same = sum(
        len(np.intersect1d(actual[b, e], expected[b, e], assume_unique=True))
        for b in range(batch)
        for e in range(experts)
    )
    return same / (batch * experts * capacity)


def classify_flips(own: np.ndarray, expected: np.ndarray, scores: np.ndarray, bounds: np.ndarray) -> tuple[int, int, float, float]:
    """Count the reference selections the graph dropped and how many are near-ties.

    A flip pairs a dropped token d (the reference chose it, the graph did not) with the tokens the graph chose
    instead (set A); its margin is the smallest s(d) - s(a) over a in A, and it is a near-tie when some a in A has
    s(d) - s(a) <= bound(d) + bound(a).

    Args:
        own: [B, E, C] the graph's selections.
        expected: [B, E, C] the reference's selections.
        scores, bounds: [B, S, E] the reference's scores and their rounding bounds.

    Returns:
        (flips, near_ties, largest margin, largest margin / bound).
    """
    flips = near = 0
    max_margin = max_ratio = 0.0
    for b in range(expected.shape[0]):
        for e in range(expected.shape[1]):
            dropped = np.setdiff1d(expected[b, e], own[b, e], assume_unique=True)
            if not dropped.size:
                continue
            added = np.setdiff1d(own[b, e], expected[b, e], assume_unique=True)
            s, bound = scores[b, :, e].astype(np.float64), bounds[b, :, e]
            margin = s[dropped][:, None] - s[added][None, :]  # [D, A]
            ratio = margin / np.maximum(bound[dropped][:, None] + bound[added][None, :], np.finfo(np.float64).tiny)
            flips += dropped.size
            near += int((ratio.min(axis=1) <= 1.0).sum())
            max_margin = max(max_margin, float(margin.min(axis=1).max()))
            max_ratio = max(max_ratio, float(ratio.min(axis=1).max()))
    return flips, near, max_margin, max_ratio
