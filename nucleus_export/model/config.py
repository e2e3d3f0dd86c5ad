"""The transformer's config.json as a typed, validated dataclass, with the quantities export needs derived from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from nucleus_runtime import contract

from nucleus_export.errors import NucleusExportError

MODEL_CLASS_NAME = "NucleusMoEImageTransformer2DModel"

# Which blocks are MoE, per diffusers' `_is_moe_layer`. diffusers treats an unknown name as "all MoE"; we refuse it,
# since a misspelled strategy would silently export the wrong architecture.
DENSE_MOE_STRATEGIES = {
    "leave_first_three_and_last_block_dense": lambda idx, n: 3 <= idx < n - 1,
    "leave_first_three_blocks_dense": lambda idx, n: idx >= 3,
    "leave_first_block_dense": lambda idx, n: idx >= 1,
    "all_moe": lambda idx, n: True,
    "all_dense": lambda idx, n: False,
}

# Pixels per latent when no VAE is at hand (a transformer folder): NucleusMoEImagePipeline's own fallback. With a
# pipeline root the factor comes from the VAE's config (model.vae.VaeConfig.scale_factor).
DEFAULT_VAE_SCALE_FACTOR = 8


def read_config_json(path: Path, missing_fix: str, restore_fix: str) -> dict[str, Any]:
    """A diffusers config.json as a dict; missing, unparsable or not an object is one error naming the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NucleusExportError(f"{path} does not exist.", missing_fix) from None
    except json.JSONDecodeError as exc:
        raise NucleusExportError(f"{path} is not valid JSON ({exc}).", restore_fix) from None
    if not isinstance(raw, dict):
        raise NucleusExportError(f"{path} is not a JSON object.", restore_fix)
    return raw


def diffusers_config_values(
    cls: type, raw: dict[str, Any], source: str, class_name: str, wrong_class_fix: str, unknown_fix: str
) -> dict[str, Any]:
    """The fields of a diffusers config dict that the dataclass `cls` takes, refusing another `_class_name` and any
    architecture field `cls` does not know (a field we ignored would silently change the model); `_`-keys are
    diffusers' bookkeeping."""
    found = raw.get("_class_name", class_name)
    if found != class_name:
        raise NucleusExportError(f"{source} describes a '{found}', not {class_name}.", wrong_class_fix)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
    if unknown:
        raise NucleusExportError(f"{source} has fields {class_name} does not take: {', '.join(unknown)}; this toolkit "
                                 "does not support them.", unknown_fix)
    return {k: v for k, v in raw.items() if k in known}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a `NucleusMoEImageTransformer2DModel`, field for field as in its config.json."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 24
    attention_head_dim: int = 128
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    mlp_ratio: float = 4.0
    moe_enabled: bool = True
    dense_moe_strategy: str = "leave_first_three_and_last_block_dense"
    num_experts: int = 128
    moe_intermediate_dim: int = 1344
    capacity_factors: tuple[float, ...] | float = 8.0
    use_sigmoid: bool = False
    route_scale: float = 2.5
    use_grouped_mm: bool = False

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        values = diffusers_config_values(
            cls, raw, source, MODEL_CLASS_NAME,
            "point --model at the Nucleus-Image transformer folder (or the pipeline root holding transformer/).",
            "use a checkpoint made for diffusers' NucleusMoEImageTransformer2DModel, or extend "
            "nucleus_export.model.config.ModelConfig and the graph builders for the new fields.",
        )  # fmt: skip
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(int(a) for a in values["axes_dims_rope"])
        if isinstance(values.get("capacity_factors"), list):
            values["capacity_factors"] = tuple(float(c) for c in values["capacity_factors"])
        config = cls(**values)
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: Path) -> ModelConfig:
        raw = read_config_json(path, "the transformer folder must hold config.json.", "restore config.json from the checkpoint.")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        if isinstance(self.capacity_factors, tuple):
            out["capacity_factors"] = list(self.capacity_factors)
        return {"_class_name": MODEL_CLASS_NAME, **out}

    def validate(self, source: str = "config") -> None:
        def fail(problem: str, fix: str) -> None:
            raise NucleusExportError(f"{source}: {problem}", fix)

        if self.dense_moe_strategy not in DENSE_MOE_STRATEGIES:
            fail(
                f"unknown dense_moe_strategy '{self.dense_moe_strategy}'.",
                f"use one of {', '.join(sorted(DENSE_MOE_STRATEGIES))}.",
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(a % 2 for a in self.axes_dims_rope):
            fail(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}.",
                "fix axes_dims_rope in config.json.",
            )
        if self.num_attention_heads % self.kv_heads:
            fail(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.kv_heads}.",
                "grouped-query attention needs a whole number of query heads per K/V head.",
            )
        if self.patch_size < 1 or self.in_channels % (self.patch_size**2):
            fail(
                f"in_channels {self.in_channels} is not divisible by patch_size**2 = {self.patch_size**2}.",
                "fix patch_size/in_channels in config.json.",
            )
        if isinstance(self.capacity_factors, tuple) and len(self.capacity_factors) != self.num_layers:
            fail(
                f"capacity_factors has {len(self.capacity_factors)} entries for {self.num_layers} layers.",
                "give one capacity factor per layer (or a single number).",
            )
        for idx in self.moe_layers:
            if self.capacity_factor(idx) < 0:
                fail(f"capacity factor of MoE layer {idx} is negative.", "use a positive capacity factor.")
        if self.moe_layers and self.num_experts < 1:
            fail("num_experts must be at least 1 when MoE layers exist.", "fix num_experts in config.json.")
        if self.dense_mlp_dim < 1 and len(self.moe_layers) < self.num_layers:
            fail(
                f"dense blocks get an MLP width of {self.dense_mlp_dim} (hidden {self.hidden_size}, mlp_ratio "
                f"{self.mlp_ratio}).",
                "use a hidden size of at least 48 or a larger mlp_ratio.",
            )

    # ---- derived quantities -------------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """Channels of `sample`, per image token: patch_size**2 * out_channels."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked VAE latent."""
        return self.in_channels // self.patch_size**2

    @property
    def dense_mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio * 2 / 3) // 128 * 128

    @property
    def rope_dim(self) -> int:
        """Width of the rope tables: one complex rotation per pair of head channels."""
        return self.attention_head_dim // 2

    @property
    def score_function(self) -> str:
        """The router's score function (a name of nucleus_runtime.contract.SCORE_FUNCTIONS)."""
        return "sigmoid" if self.use_sigmoid else "softmax"

    def capacity_factor(self, layer: int) -> float:
        if isinstance(self.capacity_factors, tuple):
            return float(self.capacity_factors[layer])
        return float(self.capacity_factors)

    def is_moe(self, layer: int) -> bool:
        return self.moe_enabled and DENSE_MOE_STRATEGIES[self.dense_moe_strategy](layer, self.num_layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe(i)]

    def capacity(self, layer: int, image_tokens: int) -> int:
        """Tokens each expert takes per batch row, exactly as diffusers computes it (float arithmetic included)."""
        return contract.capacity_from_factor(self.capacity_factor(layer), image_tokens, self.num_experts)

    def capacity_fraction(self, layer: int, max_image_tokens: int) -> tuple[int, int]:
        """The capacity factor as the integer fraction graphs and plugins compute C with (contract.capacity_fraction),
        checked against diffusers' float formula for every S up to max_image_tokens."""
        fraction = contract.capacity_fraction(self.capacity_factor(layer), self.num_experts, max_image_tokens)
        if fraction is None:
            raise NucleusExportError(
                f"capacity factor {self.capacity_factor(layer)} of layer {layer} has no exact integer form up to "
                f"{max_image_tokens} image tokens.",
                "use a capacity factor with a short decimal form, such as 2, 2.5 or 4.",
            )
        return fraction

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
