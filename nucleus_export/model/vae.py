"""The VAE of the pipeline (diffusers' `AutoencoderKLQwenImage`) as export sees it: its config.json as a validated
dataclass, the decoder's layout derived from it, a VAE folder opened and checked from its safetensors headers, and
random VAEs of the real class written with diffusers' own save_pretrained for tests and cost measurements.

Only the decoder side (`post_quant_conv.*`, `decoder.*`) is validated and exposed: the text-to-image pipeline never
encodes, so encoder tensors are ignored wherever they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nucleus_runtime.bundle import inside

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.config import diffusers_config_values, read_config_json
from nucleus_export.model.checkpoint import (
    INDEX_NAME,
    WEIGHTS_NAME,
    TensorInfo,
    WeightStore,
    read_safetensors_header,
)

VAE_CLASS_NAME = "AutoencoderKLQwenImage"
VAE_FOLDER = "vae"  # the VAE's folder inside a diffusers pipeline root
DECODER_PREFIXES = ("post_quant_conv.", "decoder.")
UPSAMPLE_2D = "upsample2d"
UPSAMPLE_3D = "upsample3d"
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_LISTED = 5


@dataclasses.dataclass(frozen=True)
class UpBlock:
    """One decoder up block (diffusers' QwenImageUpBlock): num_res_blocks + 1 residual blocks in_dim -> out_dim,
    then, unless it is the last block, a Resample whose 3x3 convolution maps out_dim to out_dim // 2 after a 2x
    nearest upsampling (and, for upsample3d, a temporal convolution that the first frame skips)."""

    index: int
    in_dim: int
    out_dim: int
    upsample: str | None


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """An `AutoencoderKLQwenImage` config.json, field for field; the defaults are diffusers' (which are also the
    released Qwen-Image VAE's)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    # ---- derived --------------------------------------------------------------------------------------------------

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each axis, as the pipeline computes it (2 ** len(temperal_downsample))."""
        return 2 ** len(self.temperal_downsample)

    @property
    def mid_dim(self) -> int:
        return self.base_dim * self.dim_mult[-1]

    @property
    def out_dim(self) -> int:
        """Channels of the last up block, what norm_out and conv_out see."""
        return self.base_dim * self.dim_mult[0]

    @property
    def up_blocks(self) -> tuple[UpBlock, ...]:
        """The decoder's up blocks as QwenImageDecoder3d lays them out (the Resample halves the channels, so every
        block after the first starts from half its predecessor's width)."""
        dims = [self.base_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        temporal = self.temperal_downsample[::-1]
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            upsample = None
            if i != len(self.dim_mult) - 1:
                upsample = UPSAMPLE_3D if temporal[i] else UPSAMPLE_2D
            blocks.append(UpBlock(i, in_dim // 2 if i > 0 else in_dim, out_dim, upsample))
        return tuple(blocks)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "vae/config.json") -> VaeConfig:
        values = diffusers_config_values(
            cls, raw, source, VAE_CLASS_NAME, "point at the vae/ folder of a Nucleus-Image (or Qwen-Image) pipeline.",
            "use the config.json that belongs to the VAE weights (diffusers' AutoencoderKLQwenImage).",
        )
        try:
            for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
                if name in values:
                    values[name] = tuple(values[name])
            config = cls(**values)
        except TypeError as exc:
            raise NucleusExportError(f"{source} has a malformed field ({exc}).", "restore the VAE's config.json.") from None
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: Path) -> VaeConfig:
        raw = read_config_json(path, "the VAE folder must hold config.json.", "restore the VAE's config.json.")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The keyword arguments of AutoencoderKLQwenImage (lists where diffusers writes lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def validate(self, source: str = "VAE config") -> None:
        def fail(problem: str, fix: str) -> None:
            raise NucleusExportError(f"{source}: {problem}", fix)

        def positive_int(value: Any) -> bool:
            return type(value) is int and value > 0

        if not positive_int(self.base_dim) or not positive_int(self.z_dim):
            fail(f"base_dim {self.base_dim!r} and z_dim {self.z_dim!r} must be positive integers.", "fix config.json.")
        if not self.dim_mult or not all(positive_int(m) for m in self.dim_mult):
            fail(f"dim_mult {list(self.dim_mult)} must be a non-empty list of positive integers.", "fix config.json.")
        if type(self.num_res_blocks) is not int or self.num_res_blocks < 0:
            fail(f"num_res_blocks {self.num_res_blocks!r} must be a non-negative integer.", "fix config.json.")
        if not all(type(t) is bool for t in self.temperal_downsample):
            fail(f"temperal_downsample {list(self.temperal_downsample)} must be a list of booleans.", "fix config.json.")
        # The decoder upsamples len(dim_mult) - 1 times; the pipeline sizes images by 2 ** len(temperal_downsample).
        # diffusers fails (shorter) or silently mis-sizes (longer) when they disagree.
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            fail(
                f"temperal_downsample has {len(self.temperal_downsample)} entries for {len(self.dim_mult)} dim_mult "
                f"levels (the decoder upsamples {len(self.dim_mult) - 1} times, the pipeline scales by "
                f"2**{len(self.temperal_downsample)}).",
                "give one temperal_downsample entry per dim_mult level but the last.",
            )
        if self.input_channels != 3:
            fail(
                f"input_channels {self.input_channels!r}: the decoder graph writes RGB images (3 channels).",
                "use an RGB VAE (input_channels 3).",
            )
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            fail(f"dropout {self.dropout!r} must lie in [0, 1).", "fix config.json.")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if len(values) != self.z_dim or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                fail(f"{name} needs {self.z_dim} finite numbers (z_dim), got {len(values)}.", "fix config.json.")
        if any(v <= 0 for v in self.latents_std):
            fail("latents_std has entries <= 0: the latents cannot be de-normalized.", "fix config.json.")


QWEN_IMAGE_VAE = VaeConfig()  # the released Qwen-Image VAE (Qwen/Qwen-Image vae/config.json), Nucleus-Image's too


# ---- decoder parameters -----------------------------------------------------------------------------------------


def _resnet_shapes(prefix: str, in_dim: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.norm1.gamma": (in_dim, 1, 1, 1),
        f"{prefix}.conv1.weight": (out_dim, in_dim, 3, 3, 3),
        f"{prefix}.conv1.bias": (out_dim,),
        f"{prefix}.norm2.gamma": (out_dim, 1, 1, 1),
        f"{prefix}.conv2.weight": (out_dim, out_dim, 3, 3, 3),
        f"{prefix}.conv2.bias": (out_dim,),
    }
    if in_dim != out_dim:
        shapes[f"{prefix}.conv_shortcut.weight"] = (out_dim, in_dim, 1, 1, 1)
        shapes[f"{prefix}.conv_shortcut.bias"] = (out_dim,)
    return shapes


def decoder_parameter_shapes(config: VaeConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every decoder-side parameter of AutoencoderKLQwenImage for this config (post_quant_conv
    and decoder.*), the unused first-frame time_conv of upsample3d blocks included."""
    z, mid = config.z_dim, config.mid_dim
    shapes: dict[str, tuple[int, ...]] = {
        "post_quant_conv.weight": (z, z, 1, 1, 1),
        "post_quant_conv.bias": (z,),
        "decoder.conv_in.weight": (mid, z, 3, 3, 3),
        "decoder.conv_in.bias": (mid,),
    }
    shapes |= _resnet_shapes("decoder.mid_block.resnets.0", mid, mid)
    attn = "decoder.mid_block.attentions.0"
    shapes |= {
        f"{attn}.norm.gamma": (mid, 1, 1),
        f"{attn}.to_qkv.weight": (3 * mid, mid, 1, 1),
        f"{attn}.to_qkv.bias": (3 * mid,),
        f"{attn}.proj.weight": (mid, mid, 1, 1),
        f"{attn}.proj.bias": (mid,),
    }
    shapes |= _resnet_shapes("decoder.mid_block.resnets.1", mid, mid)
    for block in config.up_blocks:
        prefix = f"decoder.up_blocks.{block.index}"
        in_dim = block.in_dim
        for j in range(config.num_res_blocks + 1):
            shapes |= _resnet_shapes(f"{prefix}.resnets.{j}", in_dim, block.out_dim)
            in_dim = block.out_dim
        if block.upsample is not None:
            d = block.out_dim
            shapes[f"{prefix}.upsamplers.0.resample.1.weight"] = (d // 2, d, 3, 3)
            shapes[f"{prefix}.upsamplers.0.resample.1.bias"] = (d // 2,)
            if block.upsample == UPSAMPLE_3D:
                shapes[f"{prefix}.upsamplers.0.time_conv.weight"] = (2 * d, d, 3, 1, 1)
                shapes[f"{prefix}.upsamplers.0.time_conv.bias"] = (2 * d,)
    shapes |= {
        "decoder.norm_out.gamma": (config.out_dim, 1, 1, 1),
        "decoder.conv_out.weight": (config.input_channels, config.out_dim, 3, 3, 3),
        "decoder.conv_out.bias": (config.input_channels,),
    }
    return shapes


# ---- a VAE folder -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VaeCheckpoint:
    """A validated VAE folder: its config and a lazy view of its decoder-side tensors (encoder tensors left out).

    `weights` is what a LayerEmitter streams from, as the transformer's Checkpoint.weights is."""

    vae_dir: Path
    config: VaeConfig
    weights: WeightStore


def resolve_vae_dir(path: Path) -> Path:
    """The VAE folder of a VAE folder or of a diffusers pipeline root holding vae/."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NucleusExportError(f"VAE path {path} does not exist.", "pass the vae/ folder or the pipeline root.")
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return path
    if (path / VAE_FOLDER / "config.json").is_file():
        return path / VAE_FOLDER
    raise NucleusExportError(
        f"{path} holds neither config.json nor {VAE_FOLDER}/config.json.",
        "pass the VAE folder or the diffusers pipeline root of Nucleus-Image.",
    )


def _listing(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _shards(vae_dir: Path) -> list[Path]:
    index = vae_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise NucleusExportError(
                f"{index} is not a valid index ({exc}).", "restore the index json of the VAE."
            ) from None
        paths = [inside(vae_dir, f, f"{INDEX_NAME} names shard", "restore the index json of the VAE.") for f in files]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise NucleusExportError(
                f"{index.name} names missing shards: {_listing(missing)}.", f"download them into {vae_dir}."
            )
        return paths
    if (vae_dir / WEIGHTS_NAME).is_file():
        return [vae_dir / WEIGHTS_NAME]
    raise NucleusExportError(
        f"{vae_dir} holds no {WEIGHTS_NAME} and no {INDEX_NAME}.",
        "download the VAE weights (safetensors) next to its config.json.",
    )


def open_vae(path: Path) -> VaeCheckpoint:
    """Locate and validate a VAE from its config and safetensors headers only (no tensor data is read): every
    decoder-side tensor present, of the shape the config implies and a float dtype, and none the config does not
    imply.

    Args:
        path: the vae/ folder, or a pipeline root that holds one.
    """
    vae_dir = resolve_vae_dir(path)
    config = VaeConfig.from_json_file(vae_dir / "config.json")
    tensors: dict[str, TensorInfo] = {}
    for shard in _shards(vae_dir):
        for name, info in read_safetensors_header(shard).items():
            if not name.startswith(DECODER_PREFIXES):
                continue
            if name in tensors:
                raise NucleusExportError(
                    f"tensor '{name}' appears in both {tensors[name].shard.name} and {shard.name}.",
                    "the shards come from different VAEs: download a consistent set.",
                )
            tensors[name] = info
    expected = decoder_parameter_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{n} {list(tensors[n].shape)} vs {list(shape)}"
        for n, shape in sorted(expected.items())
        if n in tensors and tensors[n].shape != shape
    ]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing ({_listing(missing)})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({_listing(unexpected)})"] if unexpected else []
        parts += [f"{len(wrong)} of another shape ({_listing(wrong)})"] if wrong else []
        raise NucleusExportError(
            f"decoder weights in {vae_dir} do not match its config.json: {'; '.join(parts)}.",
            "check that config.json belongs to these weights (base_dim, dim_mult, num_res_blocks, temperal_downsample).",
        )
    not_float = sorted(f"{n} ({info.dtype})" for n, info in tensors.items() if info.dtype not in _FLOAT_DTYPES)
    if not_float:
        raise NucleusExportError(
            f"decoder weights in {vae_dir} are not floating point: {_listing(not_float)}.",
            "convert the VAE's tensors to fp32, bf16 or fp16.",
        )
    return VaeCheckpoint(vae_dir, config, WeightStore(tensors))


# ---- random VAEs of the real class --------------------------------------------------------------------------------


def write_random_vae(out_dir: Path, config: VaeConfig, seed: int = 0) -> Path:
    """Write a random AutoencoderKLQwenImage (diffusers' own class and save_pretrained, float32) into `out_dir`.

    diffusers initializes every RMS norm's gamma to ones; here they are drawn from U(0.5, 1.5) so that a graph that
    ignored a gamma would not pass as equal. The folder appears only once complete (written beside it, renamed).
    """
    import torch
    from diffusers import AutoencoderKLQwenImage

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(**config.to_dict()).eval()
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        vae.save_pretrained(tmp)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
