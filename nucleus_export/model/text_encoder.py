"""The pipeline's text encoder (Qwen3-VL, language model only): its config, its checkpoint and writers of random ones.

NucleusMoEImagePipeline runs transformers' `Qwen3VLForConditionalGeneration` on the chat-formatted prompt and keeps
`hidden_states[return_index]` (default -8). transformers' `hidden_states` has num_hidden_layers + 1 entries: [0] is
the token embeddings, [k] for 1 <= k < N the residual stream after decoder layer k-1, and [N] the stream after the
last layer and the final RMSNorm (its capture hook overwrites the last entry with `last_hidden_state`). So index -8
of Qwen3-VL-8B's 36 layers is [29]: layers 0..28 and no final norm. The graph keeps exactly those layers; the last
seven, the final norm, the LM head and the vision tower are never read.

A checkpoint is transformers' layout of `text_encoder/` (config.json, `model.safetensors` or shards with
`model.safetensors.index.json`), or a pipeline root holding it. Validation reads only the safetensors headers.
Random checkpoints exist for tests (`write_tiny_text_encoder`: transformers' own class and save_pretrained) and for
scale measurements (`write_synthetic_text_encoder`: the real dimensions, streamed tensor by tensor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any

from nucleus_runtime.atomic import atomic_dir
from nucleus_runtime.bundle import inside

from nucleus_export.cache import cache_root
from nucleus_export.errors import NucleusExportError, UsageError
from nucleus_export.model.checkpoint import (
    TensorInfo,
    WeightStore,
    read_safetensors_header,
)

MODEL_TYPE = "qwen3_vl"
TEXT_MODEL_TYPE = "qwen3_vl_text"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
# Where Qwen3VLForConditionalGeneration's state dict keeps the language model (transformers >= 4.57 layout).
LANGUAGE_MODEL = "model.language_model"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TEXT_ENCODER_FOLDER = "text_encoder"
# NucleusMoEImagePipeline.default_return_index
DEFAULT_RETURN_INDEX = -8

_LISTED = 5
_FIX_CONFIG = "point at the text_encoder folder of Nucleus-Image (transformers' Qwen3VLForConditionalGeneration)."


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The language model of a Qwen3-VL text encoder (config.json's `text_config`) and the hidden state kept.

    Attributes:
        return_index: the `hidden_states` index the pipeline keeps (NucleusMoEImagePipeline's `return_index`).
        mrope_section: the multimodal RoPE's split of the head's frequencies into (t, h, w) sections. For text all
            three position components are equal, so it does not change the rotation; it is kept for the record.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    return_index: int = DEFAULT_RETURN_INDEX

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], return_index: int = DEFAULT_RETURN_INDEX,
                  source: str = "config.json") -> TextEncoderConfig:
        """Parse a Qwen3VLConfig dict (the whole text_encoder/config.json), refusing what the graph does not do."""

        def fail(problem: str, fix: str = _FIX_CONFIG) -> NucleusExportError:
            return NucleusExportError(f"{source}: {problem}", fix)

        if not isinstance(raw, dict):
            raise fail("is not a JSON object.")
        if raw.get("model_type") != MODEL_TYPE:
            raise fail(f"describes a '{raw.get('model_type')}' model, not Qwen3-VL ('{MODEL_TYPE}').")
        architectures = raw.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in architectures:
            raise fail(f"describes {', '.join(map(str, architectures))}, not {ARCHITECTURE} (whose weights live under "
                       f"{LANGUAGE_MODEL}.*).")
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise fail("has no text_config object.")
        if text.get("model_type", TEXT_MODEL_TYPE) != TEXT_MODEL_TYPE:
            raise fail(f"text_config describes a '{text['model_type']}' model, not '{TEXT_MODEL_TYPE}'.")
        if text.get("hidden_act", "silu") != "silu":
            raise fail(f"text_config.hidden_act is '{text['hidden_act']}'; the graph implements SwiGLU with silu only.",
                       "use a Qwen3-VL checkpoint (hidden_act silu).")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise fail("text_config.rope_parameters is not an object.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        # mrope_section / mrope_interleaved only lay out Qwen3-VL's 3D positions; rope_theta is the base. Anything
        # else (factor, original_max_position_embeddings, ...) rescales frequencies, which the graph does not do.
        scaling = sorted(set(rope) - {"rope_type", "type", "rope_theta", "mrope_section", "mrope_interleaved"})
        if rope_type != "default" or scaling:
            raise fail(f"RoPE type '{rope_type}'" + (f" with scaling ({', '.join(scaling)})" if scaling else "")
                       + " is not implemented; the graph does plain (default) RoPE.",
                       "use a Qwen3-VL checkpoint with rope_type 'default', or extend graph/text_encoder.py.")
        theta = rope.get("rope_theta", text.get("rope_theta"))
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 1:
            raise fail(f"text_config has no usable rope_theta (got {theta!r}).", "restore config.json from the checkpoint.")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim")
        values: dict[str, Any] = {}
        for key in (*required, "num_key_value_heads"):
            value = text.get(key)
            if key == "num_key_value_heads" and value is None:
                value = values["num_attention_heads"]  # transformers' default: multi-head attention
            if type(value) is not int or value < 1:
                raise fail(f"text_config.{key} must be a positive integer (got {value!r}).",
                           "restore config.json from the checkpoint.")
            values[key] = value
        section = rope.get("mrope_section", [])
        if not isinstance(section, list) or not all(type(s) is int and s >= 0 for s in section):
            raise fail(f"mrope_section {section!r} is not a list of non-negative integers.",
                       "restore config.json from the checkpoint.")
        config = cls(
            **values,
            rope_theta=float(theta),
            mrope_section=tuple(section),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(text.get("attention_bias", False)),
            return_index=return_index,
        )
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: Path, return_index: int = DEFAULT_RETURN_INDEX) -> TextEncoderConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise NucleusExportError(f"{path} does not exist.", "the text encoder folder must hold config.json.") from None
        except json.JSONDecodeError as exc:
            raise NucleusExportError(f"{path} is not valid JSON ({exc}).", "restore config.json from the checkpoint.") from None
        return cls.from_dict(raw, return_index, source=str(path))

    def validate(self, source: str = "config") -> None:
        n = self.num_hidden_layers
        if self.num_attention_heads % self.num_key_value_heads:
            raise NucleusExportError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}.",
                "grouped-query attention needs a whole number of query heads per K/V head.",
            )
        if self.head_dim % 2:
            raise NucleusExportError(f"{source}: head_dim {self.head_dim} is odd.", "RoPE rotates channel pairs.")
        if type(self.return_index) is not int or self.return_index == 0 or abs(self.return_index) >= n:
            # The pipeline refuses |return_index| >= num_hidden_layers, and reads 0 as "use the default" (-8).
            raise UsageError(
                f"return_index {self.return_index!r} is not a hidden state the pipeline can keep.",
                f"use a non-zero integer with |return_index| < {n} (the pipeline's default is {DEFAULT_RETURN_INDEX}).",
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mrope_section"] = list(self.mrope_section)
        return out

    @classmethod
    def from_fields(cls, raw: dict[str, Any], source: str = "text encoder config") -> TextEncoderConfig:
        """The config back from `to_dict` (as a bundle's manifest records it), checked like a config.json."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != known:
            raise NucleusExportError(f"{source} has fields {sorted(raw) if isinstance(raw, dict) else raw!r}; expected "
                                     f"{sorted(known)}.", "export the bundle again with this version of nucleus-export.")
        config = cls(**{**raw, "mrope_section": tuple(raw["mrope_section"])})
        config.validate(source)
        return config

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    # ---- derived quantities -------------------------------------------------------------------------------------

    @property
    def hidden_state_index(self) -> int:
        """The non-negative index into transformers' num_hidden_layers + 1 hidden states."""
        return self.return_index if self.return_index > 0 else self.num_hidden_layers + 1 + self.return_index

    @property
    def kept_layers(self) -> int:
        """Decoder layers the graph runs (and the manifest records): layers 0 .. kept_layers - 1."""
        return self.hidden_state_index

    @property
    def final_norm(self) -> bool:
        """Whether the kept hidden state is the last one, which transformers takes after the final RMSNorm."""
        return self.hidden_state_index == self.num_hidden_layers

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim


def layer_prefix(index: int) -> str:
    return f"{LANGUAGE_MODEL}.layers.{index}"


def language_model_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every language-model tensor of Qwen3VLForConditionalGeneration for this config (all
    num_hidden_layers layers: a checkpoint with other layer counts belongs to another config)."""
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {f"{LANGUAGE_MODEL}.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        for proj, (out_dim, in_dim) in {"q_proj": (config.q_dim, h), "k_proj": (config.kv_dim, h),
                                        "v_proj": (config.kv_dim, h), "o_proj": (h, config.q_dim)}.items():
            shapes[f"{p}.self_attn.{proj}.weight"] = (out_dim, in_dim)
            if config.attention_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (out_dim,)
        shapes[f"{p}.self_attn.q_norm.weight"] = (d,)
        shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, config.intermediate_size)
    shapes[f"{LANGUAGE_MODEL}.norm.weight"] = (h,)
    return shapes


# ---- opening a checkpoint -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextEncoderCheckpoint:
    """A validated text encoder checkpoint.

    Attributes:
        folder: the folder with config.json and the safetensors shards.
        config: the language model's architecture and the kept hidden state.
        weights: lazy view of the language-model tensors only (vision tower and LM head left out).
    """

    folder: Path
    config: TextEncoderConfig
    weights: WeightStore


def resolve_text_encoder_dir(path: Path) -> Path:
    """The text encoder folder for itself or for a diffusers pipeline root holding `text_encoder/`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NucleusExportError(f"text encoder path {path} does not exist.", _FIX_CONFIG)
    if (path / "model_index.json").is_file() and (path / TEXT_ENCODER_FOLDER / "config.json").is_file():
        return path / TEXT_ENCODER_FOLDER
    if (path / "config.json").is_file():
        return path
    raise NucleusExportError(f"{path} holds neither config.json nor {TEXT_ENCODER_FOLDER}/config.json.", _FIX_CONFIG)


def _shard_headers(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's shards, checked against the index when there is one."""
    fix = "download the text encoder's index and shards from the same checkpoint revision."
    index_path = folder / INDEX_NAME
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise NucleusExportError(f"{index_path} is not a valid index ({exc}).", fix) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise NucleusExportError(f"{index_path} has no weight_map of tensor name -> shard file.", fix)
        names = sorted(set(weight_map.values()))
        shards = [inside(folder, name, f"{INDEX_NAME} names shard", fix) for name in names]
        missing = [name for name, shard in zip(names, shards) if not shard.is_file()]
        if missing:
            raise NucleusExportError(f"{INDEX_NAME} names shard files that are missing: {_listing(missing)}.",
                                     f"download the missing shards into {folder}.")
    elif (folder / WEIGHTS_NAME).is_file():
        shards = [folder / WEIGHTS_NAME]
    else:
        found = sorted(folder.glob("model*.safetensors"))
        raise NucleusExportError(
            f"{folder} has {len(found)} safetensors shards but no {INDEX_NAME}." if found
            else f"{folder} holds no {WEIGHTS_NAME} and no {INDEX_NAME}.",
            "download the text encoder's weights (safetensors, with the index json when sharded) next to config.json.",
        )
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_safetensors_header(shard).items():
            if name in tensors:
                raise NucleusExportError(f"tensor '{name}' appears in both {tensors[name].shard.name} and {shard.name}.", fix)
            tensors[name] = info
    if weight_map is not None:
        absent = sorted(n for n in weight_map if n not in tensors)
        misplaced = sorted(n for n, f in weight_map.items() if n in tensors and tensors[n].shard.name != Path(f).name)
        if absent or misplaced:
            raise NucleusExportError(
                f"{INDEX_NAME} does not match the shards: "
                + "; ".join(part for part in (
                    f"{len(absent)} indexed tensors are in no shard ({_listing(absent)})" if absent else "",
                    f"{len(misplaced)} tensors are in another shard than indexed ({_listing(misplaced)})" if misplaced else "",
                ) if part) + ".",
                fix,
            )
    return tensors


def open_text_encoder(path: Path, return_index: int = DEFAULT_RETURN_INDEX) -> TextEncoderCheckpoint:
    """Locate and validate a text encoder checkpoint: config, index, shard headers, the language model's names and
    shapes against the config. No tensor data is read.

    Args:
        path: the text_encoder folder or a diffusers pipeline root.
        return_index: the hidden state the pipeline keeps.
    """
    folder = resolve_text_encoder_dir(path)
    config = TextEncoderConfig.from_json_file(folder / "config.json", return_index)
    tensors = _shard_headers(folder)
    expected = language_model_shapes(config)
    prefix = LANGUAGE_MODEL + "."
    found = {n: info for n, info in tensors.items() if n.startswith(prefix)}
    if not found:
        raise NucleusExportError(
            f"{folder} holds no {prefix}* tensors (an older or a text-only layout).",
            "save the text encoder with transformers >= 4.57 (Qwen3VLForConditionalGeneration.save_pretrained).",
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{n} {found[n].shape} vs config {expected[n]}" for n in sorted(expected) if n in found
                  and found[n].shape != expected[n]]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing ({_listing(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_listing(unexpected)})" if unexpected else "",
                 f"{len(mismatched)} shape mismatches ({_listing(mismatched)})" if mismatched else ""]
        raise NucleusExportError(
            f"language-model weights in {folder} do not match config.json: {'; '.join(p for p in parts if p)}.",
            "check that config.json belongs to these weights (layers, hidden size, heads, head_dim, vocabulary).",
        )
    return TextEncoderCheckpoint(folder, config, WeightStore(found))


def open_text_encoder_model(spec: str | Path, return_index: int = DEFAULT_RETURN_INDEX) -> TextEncoderCheckpoint:
    """A text encoder as the CLI would name it: `synthetic:qwen3-vl-text?layers=N` or a folder."""
    if str(spec).startswith(SYNTHETIC_PREFIX):
        return open_text_encoder(ensure_synthetic_text_encoder(str(spec)), return_index)
    return open_text_encoder(Path(spec), return_index)


# ---- random checkpoints -------------------------------------------------------------------------------------------

# A vision tower as small as Qwen3VLVisionConfig allows: present in the checkpoint (and ignored) as in the real one.
TINY_VISION_CONFIG: dict[str, Any] = {
    "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 4,
    "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
}


# Tiny configurations of the real class for tests and benchmarks, with the return_index each is read at: GQA 2:1
# with the pipeline's default (-8 of 9 layers: 2 kept, as in the toy pipeline); MHA with head_dim * heads != hidden,
# attention biases, other mrope sections and return_index -1 (every layer + the final norm).
TINY_TEXT_CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "gqa": ({"vocab_size": 128, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 9,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2]}}, -8),
    "mha": ({"vocab_size": 128, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 24, "attention_bias": True,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 3, 3]}}, -1),
}  # fmt: skip


def write_tiny_text_encoder(out_dir: Path, text_config: dict[str, Any], seed: int = 0, dtype: str = "float32",
                            max_shard_size: str | int | None = None) -> Path:
    """A random Qwen3VLForConditionalGeneration of `text_config` (Qwen3VLTextConfig fields), saved by transformers'
    own save_pretrained in `dtype`; with `max_shard_size`, sharded with an index json like the real checkpoint."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(text_config=text_config,
                           vision_config={**TINY_VISION_CONFIG, "out_hidden_size": text_config["hidden_size"]})
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval().to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(tmp, **kwargs)
    return out_dir


SYNTHETIC_PREFIX = "synthetic:"
QWEN3_VL_TEXT = "qwen3-vl-text"
QWEN3_VL_8B_LAYERS = 36
# Qwen3-VL-8B's config.json as published (the layout Nucleus-Image's text_encoder/ has): the legacy rope_scaling
# form, which transformers >= 5 reads as rope_parameters. The vision tower only decides which bytes the shards hold.
QWEN3_VL_8B_CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": MODEL_TYPE,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": TEXT_MODEL_TYPE,
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": QWEN3_VL_8B_LAYERS,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "rope_theta": 5000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "dtype": "bfloat16",
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
        "hidden_act": "gelu_pytorch_tanh",
    },
}
SYNTHETIC_SEED = 0
# Bump when the writer changes, so cached synthetic checkpoints of the old kind are not reused.
SYNTHETIC_INIT_VERSION = 1
SHARD_BYTES = 5 << 30  # transformers' default max_shard_size: 4 shards for Qwen3-VL-8B, as published


def qwen3_vl_8b_config(layers: int = QWEN3_VL_8B_LAYERS) -> dict[str, Any]:
    """Qwen3-VL-8B's config.json with `layers` decoder layers."""
    if layers < 2:
        raise UsageError(f"a synthetic text encoder needs at least 2 layers, got {layers}.", "use layers=2..36.")
    return {**QWEN3_VL_8B_CONFIG, "text_config": {**QWEN3_VL_8B_CONFIG["text_config"], "num_hidden_layers": layers}}


def parse_synthetic_spec(spec: str) -> tuple[dict[str, Any], int]:
    """`synthetic:qwen3-vl-text[?layers=N][&seed=S]` -> (config.json dict, seed)."""
    name, _, query = str(spec)[len(SYNTHETIC_PREFIX):].partition("?")
    usage = f"use {SYNTHETIC_PREFIX}{QWEN3_VL_TEXT}?layers=N&seed=S."
    if name != QWEN3_VL_TEXT:
        raise UsageError(f"unknown synthetic text encoder '{name}'.", usage)
    try:
        params = dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))
        unknown = sorted(set(params) - {"layers", "seed"})
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)} in '{spec}'.", usage)
        return qwen3_vl_8b_config(int(params.get("layers", QWEN3_VL_8B_LAYERS))), int(params.get("seed", SYNTHETIC_SEED))
    except ValueError:
        raise UsageError(f"cannot read the options in '{spec}' (layers and seed are integers).", usage) from None


def full_model_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of Qwen3VLForConditionalGeneration (vision tower and LM head included), from the real class built
    on the meta device (no memory)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _transformers_shard(k: int, count: int) -> str:
    return f"model-{k:05d}-of-{count:05d}.safetensors" if count > 1 else WEIGHTS_NAME


def write_synthetic_text_encoder(out_dir: Path, config: dict[str, Any], seed: int = SYNTHETIC_SEED,
                                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a random bf16 checkpoint of `config` (a config.json dict) in transformers' sharded layout
    (nucleus_export.model.synthetic.write_random_checkpoint: constant memory, atomic)."""
    from nucleus_export.model.synthetic import write_random_checkpoint

    TextEncoderConfig.from_dict(config, source="synthetic config")  # refuse what the graph could not read anyway
    return write_random_checkpoint(out_dir, full_model_shapes(config), config, _transformers_shard, INDEX_NAME,
                                   "a synthetic text encoder", seed, shard_bytes)


def synthetic_text_encoder_path(spec: str) -> Path:
    """The cache folder a synthetic spec resolves to (under NUCLEUS_EXPORT_CACHE)."""
    config, seed = parse_synthetic_spec(spec)
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    layers = config["text_config"]["num_hidden_layers"]
    return cache_root() / f"synthetic-{QWEN3_VL_TEXT}-L{layers}-{key}-seed{seed}-init{SYNTHETIC_INIT_VERSION}"


def ensure_synthetic_text_encoder(spec: str) -> Path:
    """The cached synthetic text encoder for `spec`, written on first use."""
    path = synthetic_text_encoder_path(spec)
    if not (path / "config.json").is_file():
        config, seed = parse_synthetic_spec(spec)
        write_synthetic_text_encoder(path, config, seed)
    return path
