"""Profiles TensorRT cannot build are refused before any work, with the reason and what fits."""

from __future__ import annotations

import pytest
from nucleus_runtime.bundle import Profiles

from nucleus_export.build import BuildOptions, build_bundle
from nucleus_export.engines.flavors import resolve_flavor
from nucleus_export.engines.profiles import TOPK_MAX_K, check_profile_limits, profile_limit_problems
from nucleus_export.errors import NucleusExportError
from nucleus_export.export import ExportOptions
from nucleus_export.model.config import ModelConfig


def _profiles(*resolutions: tuple[int, int]) -> Profiles:
    grids = [(h // 16, w // 16) for h, w in resolutions]
    return Profiles(batch=(1, 2, 2), text_len=(1, 64, 256), resolutions=list(resolutions), grids=grids,
                    opt_resolution=resolutions[0])


def test_issue_example_is_refused_with_the_largest_fitting_size():
    config = ModelConfig(num_layers=1, num_attention_heads=4, num_key_value_heads=2, attention_head_dim=32,
                         joint_attention_dim=64, dense_moe_strategy="all_moe", num_experts=6,
                         capacity_factors=3.0, moe_intermediate_dim=64)
    assert config.moe_layers == [0]
    assert config.capacity(0, 128 * 128) == 8192 > TOPK_MAX_K
    with pytest.raises(NucleusExportError, match="C=8192 exceeds TensorRT's TopK limit") as info:
        check_profile_limits(config, _profiles((1024, 1024), (2048, 2048)), float32=False, combine="chain")
    # C <= 3840 needs S <= 7680 tokens: 1024x1024 (4096) is served and fits; squares fit up to 1392x1392 (87^2).
    assert "largest served resolution that fits is 1024x1024" in info.value.fix
    assert "up to 1392x1392" in info.value.fix
    check_profile_limits(config, _profiles((1024, 1024)), float32=False, combine="chain")
    # Plugins route without TopK.
    check_profile_limits(config, _profiles((2048, 2048)), float32=False, combine=None)


def test_volume_limits_of_onehot_and_float32_attention():
    config = ModelConfig(num_layers=4, num_attention_heads=16, num_key_value_heads=4, joint_attention_dim=4096,
                         dense_moe_strategy="leave_first_three_blocks_dense", num_experts=64,
                         capacity_factors=(0.0, 0.0, 0.0, 4.0))
    tokens = 128 * 128  # 2048x2048
    problems = profile_limit_problems(config, 2, tokens, 1024, False, "onehot")
    assert problems and "one-hot combine tensor" in problems[0]
    assert profile_limit_problems(config, 2, tokens, 1024, False, "chain") == []
    assert "float32 attention" in profile_limit_problems(config, 2, tokens, 1024, True, "chain")[0]
    with pytest.raises(NucleusExportError, match="one-hot") as info:
        check_profile_limits(config, _profiles((1024, 1024), (2048, 2048)), float32=False, combine="onehot")
    assert "--combine chain" in info.value.fix


def test_build_refuses_before_export(tiny_checkpoint, tmp_path):
    """Tiny model: 8 experts, capacity factor 4 -> C = S/2 > 3840 at 1536x1536. Nothing is written."""
    resolve_flavor("tensorrt-rtx")
    out = tmp_path / "bundle"
    options = ExportOptions(resolutions=[(512, 512), (1536, 1536)], max_text_len=16)
    with pytest.raises(NucleusExportError, match="TopK limit") as info:
        build_bundle(tiny_checkpoint, out, options, BuildOptions(flavor="tensorrt-rtx", quality=False))
    assert "512x512" in info.value.fix
    assert not out.exists() and not list(tmp_path.iterdir())
