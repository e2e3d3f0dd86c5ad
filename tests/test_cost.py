"""The cost model behind --combine auto and `inspect --bundle`, checked against the H200 timings of issue 12."""

from __future__ import annotations

import pytest

from nucleus_export.costs import combine as cost
from nucleus_export.costs import roofline
from nucleus_export.model.config import ModelConfig

# The real Nucleus-Image architecture (DESIGN.md): 32 blocks, hidden 2048, 64 experts, capacity factors 4, 4, 2...
REAL = ModelConfig(
    num_layers=32, num_attention_heads=16, num_key_value_heads=4, joint_attention_dim=4096,
    dense_moe_strategy="leave_first_three_blocks_dense", num_experts=64,
    capacity_factors=tuple([0.0] * 3 + [4.0, 4.0] + [2.0] * 27),
)

# Issue 12, H200, bf16, B=2, E=64, H=2048, capacity factor 2: measured ms of one combine.
H200_MS = {"onehot": {4096: 0.70, 16384: 10.39}, "chain": {4096: 2.95, 16384: 2.75}}


@pytest.mark.parametrize("formulation", ["onehot", "chain"])
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_model_reproduces_the_h200_timings(formulation, tokens):
    """With PyTorch's per-op overhead (the measurements ran eager ops), the model lands within 30% of each."""
    shape = cost.CombineShape(2, tokens, 64, 2 * tokens // 64, 2048)
    modeled = cost.COMBINE_COSTS[formulation](shape).seconds(roofline.GPUS["h200"], launch_seconds=roofline.EAGER_LAUNCH_SECONDS)
    assert modeled * 1e3 == pytest.approx(H200_MS[formulation][tokens], rel=0.3)


def test_crossover_matches_the_measured_order():
    """One-hot wins at 1 MP and loses at 4 MP on the H200, as measured; engines (cheaper launches) cross earlier."""
    h200 = roofline.GPUS["h200"]
    eager = cost.crossover_tokens(REAL, 2, h200, launch_seconds=roofline.EAGER_LAUNCH_SECONDS)
    engine = cost.crossover_tokens(REAL, 2, h200)
    assert 4096 < engine < eager < 16384


def test_onehot_is_quadratic_and_chain_linear():
    small, large = (cost.CombineShape(2, s, 64, 2 * s // 64, 2048) for s in (4096, 16384))
    assert cost.onehot_cost(large).flops == pytest.approx(16 * cost.onehot_cost(small).flops)
    assert cost.chain_cost(large).bytes == pytest.approx(4 * cost.chain_cost(small).bytes)
    assert cost.chain_cost(large).launches == cost.chain_cost(small).launches == 64 * cost.CHAIN_KERNELS_PER_EXPERT + 2


@pytest.mark.parametrize("gpu", sorted(roofline.GPUS))
def test_auto_choice_follows_resolution(gpu):
    low = cost.choose_combine("auto", REAL, 2, [1024], gpu=gpu)
    high = cost.choose_combine("auto", REAL, 2, [16384], gpu=gpu)
    assert (low.formulation, high.formulation) == ("onehot", "chain")
    assert low.crossover_tokens == high.crossover_tokens and 1024 < low.crossover_tokens < 16384
    forced = cost.choose_combine("onehot", REAL, 2, [16384], gpu=gpu)
    assert forced.formulation == "onehot" and forced.seconds["onehot"][16384] > forced.seconds["chain"][16384]


def test_model_without_moe_has_no_crossover():
    dense = ModelConfig(num_layers=2, moe_enabled=False)
    assert cost.crossover_tokens(dense, 2, roofline.GPUS["h100"]) is None


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown combine"):
        cost.choose_combine("sorted", REAL, 2, [4096])
