"""Checkpoint loading: layouts, validation errors (one test per bad input), memory while streaming."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.checkpoint import INDEX_NAME, open_checkpoint
from nucleus_export.model.specs import open_model
from nucleus_export.model.config import ModelConfig
from nucleus_export.model.tiny import TINY_CONFIG, write_checkpoint


def _shards(folder):
    return sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))


def test_tiny_checkpoint_has_real_layout(tiny_checkpoint_dir):
    assert (tiny_checkpoint_dir / "config.json").is_file()
    assert (tiny_checkpoint_dir / INDEX_NAME).is_file()
    assert len(_shards(tiny_checkpoint_dir)) >= 2
    config = ModelConfig.from_json_file(tiny_checkpoint_dir / "config.json")
    assert config.kv_heads < config.num_attention_heads  # GQA
    assert config.num_experts > 1 and len(config.moe_layers) >= 2
    assert len(config.moe_layers) < config.num_layers  # dense blocks too
    assert len({config.capacity_factor(i) for i in config.moe_layers}) > 1


def test_tiny_checkpoint_is_deterministic(tiny_checkpoint, tmp_path):
    again = open_checkpoint(write_checkpoint(tmp_path / "again"))
    for name in ("transformer_blocks.3.img_mlp.experts.gate_up_proj", "img_in.weight"):
        np.testing.assert_array_equal(again.weights.read(name), tiny_checkpoint.weights.read(name))


def test_tiny_weights_match_diffusers_loader(tiny_checkpoint, tiny_reference):
    state = tiny_reference.state_dict()
    for name in tiny_checkpoint.weights:
        np.testing.assert_array_equal(tiny_checkpoint.weights.read(name), state[name].numpy())


def test_pipeline_root_and_single_file(tiny_checkpoint_dir, tmp_path):
    root = tmp_path / "pipeline"
    shutil.copytree(tiny_checkpoint_dir, root / "transformer")
    (root / "model_index.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    ckpt = open_model(root)
    assert ckpt.transformer_dir == root / "transformer" and ckpt.scheduler_dir == root / "scheduler"
    single = write_checkpoint(tmp_path / "single", max_shard_size="1GB")
    assert not (single / INDEX_NAME).exists()
    assert len(open_checkpoint(single).weights) == len(ckpt.weights)


def _expect(path, *fragments):
    with pytest.raises(NucleusExportError) as info:
        open_checkpoint(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Fix:" in message
    return message


def test_missing_shard(checkpoint_copy):
    shard = _shards(checkpoint_copy)[1]
    shard.unlink()
    _expect(checkpoint_copy, shard.name, "missing")


def test_truncated_shard(checkpoint_copy):
    shard = _shards(checkpoint_copy)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _expect(checkpoint_copy, shard.name, "truncated")


def test_corrupt_header(checkpoint_copy):
    shard = _shards(checkpoint_copy)[0]
    data = bytearray(shard.read_bytes())
    data[10:30] = b"\xff" * 20
    shard.write_bytes(bytes(data))
    _expect(checkpoint_copy, shard.name, "not a valid safetensors")


def test_index_names_missing_file(checkpoint_copy):
    index = json.loads((checkpoint_copy / INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "diffusion_pytorch_model-99999.safetensors"
    (checkpoint_copy / INDEX_NAME).write_text(json.dumps(index))
    _expect(checkpoint_copy, "diffusion_pytorch_model-99999.safetensors", "missing")


def test_shards_without_index(checkpoint_copy):
    (checkpoint_copy / INDEX_NAME).unlink()
    _expect(checkpoint_copy, "no diffusion_pytorch_model.safetensors.index.json")


def test_config_weight_shape_mismatch(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["moe_intermediate_dim"] = 96
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    _expect(checkpoint_copy, "shape mismatches", "gate_up_proj")


def test_missing_and_unexpected_keys(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["num_layers"] = 6
    config["capacity_factors"] = config["capacity_factors"] + [2.0]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    message = _expect(checkpoint_copy, "missing keys", "transformer_blocks.5")
    assert "more" in message  # a few listed, the rest counted
    config["num_layers"] = 4
    config["capacity_factors"] = config["capacity_factors"][:4]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    _expect(checkpoint_copy, "unexpected keys", "transformer_blocks.4")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("dense_moe_strategy", "every_other_block", "unknown dense_moe_strategy"),
        ("use_additional_t_cond", True, "not support"),
        ("axes_dims_rope", [8, 12, 10], "axes_dims_rope"),
        ("num_key_value_heads", 3, "not a multiple"),
        ("_class_name", "QwenImageTransformer2DModel", "QwenImageTransformer2DModel"),
    ],
)
def test_unsupported_architecture_fields(checkpoint_copy, field, value, fragment):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config[field] = value
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    _expect(checkpoint_copy, fragment)


def test_model_path_errors(tmp_path):
    with pytest.raises(NucleusExportError, match="does not exist"):
        open_model(tmp_path / "nowhere")
    with pytest.raises(NucleusExportError, match="neither config.json"):
        open_model(tmp_path)


def test_capacity_matches_diffusers_float_math():
    config = ModelConfig.from_dict({**TINY_CONFIG, "capacity_factors": [0, 0, 0, 2.5, 1.25], "num_experts": 12})
    for layer in config.moe_layers:
        num, den = config.capacity_fraction(layer, 4096)
        for tokens in (1, 7, 64, 100, 4096):
            assert max(1, -(-num * tokens // (den * 12))) == config.capacity(layer, tokens)


def test_streaming_peak_memory_stays_far_below_checkpoint_size(tmp_path):
    """Validate and stream every tensor of a ~300 MB, multi-shard checkpoint; peak RSS growth must stay small."""
    big = {
        **TINY_CONFIG,
        "attention_head_dim": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "axes_dims_rope": [16, 24, 24],
        "joint_attention_dim": 256,
        "num_experts": 16,
        "moe_intermediate_dim": 512,
        "num_layers": 8,
        "capacity_factors": [0, 0, 0, 4, 2, 2, 2, 2],
    }
    folder = write_checkpoint(tmp_path / "big", big, max_shard_size="40MB")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert size > 250e6 and len(_shards(folder)) >= 3
    script = textwrap.dedent(
        f"""
        import zlib
        from nucleus_export.model.checkpoint import open_checkpoint, expected_parameter_shapes
        from nucleus_export.model.config import ModelConfig
        expected_parameter_shapes(ModelConfig.from_json_file({str(folder / 'config.json')!r}))  # warm imports
        def status(field):
            line = next(l for l in open('/proc/self/status') if l.startswith(field))
            return int(line.split()[1]) * 1024
        open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
        base = status('VmRSS')
        ckpt = open_checkpoint({str(folder)!r})
        crc = 0
        for name in ckpt.weights:
            crc = zlib.crc32(ckpt.weights.read(name).view('uint8').data, crc)
        peak = status('VmHWM')
        largest = max(ckpt.weights.info(n).nbytes for n in ckpt.weights)
        print(peak - base, largest)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    growth, largest = int(out[0]), int(out[1])
    print(f"checkpoint {size / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB")
    assert growth < 0.25 * size
    assert growth < 4 * largest + 32e6
