"""Engine optimization profiles: the shape ranges of a bundle's graphs, and the sizes TensorRT cannot build.

Facts this relies on (engines/README-facts.md): an IOptimizationProfile with min > opt is invalid (add_optimization_
profile returns -1), so ranges are validated first and the user gets the input name and the numbers; TopK rejects
K > 3840 at build time, after parsing; no tensor may exceed 2^31 elements.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from nucleus_runtime import contract
from nucleus_runtime.bundle import Manifest, Profiles

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.config import ModelConfig

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
DimRange = tuple[int, int, int]


def validate_dim_ranges(ranges: dict[str, DimRange]) -> None:
    """Every symbolic dim range must satisfy 1 <= min <= opt <= max (0 <= min for contract.ZERO_ALLOWED_DIMS)."""
    for dim, rng in ranges.items():
        if len(rng) != 3 or any(int(v) != v for v in rng):
            raise NucleusExportError(f"profile range for '{dim}' must be three integers (min, opt, max), got {rng}.")
        lo, opt, hi = rng
        floor = 0 if dim in contract.ZERO_ALLOWED_DIMS else 1
        if not floor <= lo <= opt <= hi:
            raise NucleusExportError(
                f"impossible profile range for '{dim}': min={lo}, opt={opt}, max={hi} (need {floor} <= min <= opt <= max).",
                "fix the range (--max-batch, --max-text-len, --resolutions) so the opt value lies inside it.",
            )


def onnx_input_shapes(onnx_path: Path) -> dict[str, list[int | str]]:
    """Graph input shapes (ints for static dims, names for symbolic ones), read without loading external data."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]
    return shapes


def profile_shapes(input_shapes: dict[str, list[int | str]], ranges: dict[str, DimRange]) -> dict[str, ShapeTriple]:
    """Min/opt/max shape per graph input: static dims as they are, symbolic dims from `ranges` (batch, text_len, ...),
    which dim_ranges_from_manifest has validated.

    Raises:
        NucleusExportError: an input has a symbolic dim with no range.
    """
    shapes: dict[str, ShapeTriple] = {}
    for name, dims in input_shapes.items():
        triple: list[list[int]] = [[], [], []]
        for dim in dims:
            if isinstance(dim, str):
                if dim not in ranges:
                    raise NucleusExportError(
                        f"graph input '{name}' has the symbolic dim '{dim}', which no profile range covers "
                        f"(known: {', '.join(sorted(ranges))}).",
                        "export the graph again with this version of nucleus-export (dims are named batch, text_len, "
                        "image_tokens).",
                    )
                for k in range(3):
                    triple[k].append(int(ranges[dim][k]))
            else:
                if dim <= 0:
                    raise NucleusExportError(f"graph input '{name}' has an unnamed dynamic dim.", "name every dynamic dim.")
                for k in range(3):
                    triple[k].append(dim)
        shapes[name] = (tuple(triple[0]), tuple(triple[1]), tuple(triple[2]))
    return shapes


def dim_ranges_from_profiles(profiles: Profiles) -> dict[str, DimRange]:
    """The symbolic-dim ranges of a bundle's Manifest.profiles (batch, text_len, image_tokens), validated once here
    for every graph built from them.

    Raises:
        NucleusExportError: a range is impossible.
    """
    ranges = {
        contract.BATCH_DIM: tuple(int(v) for v in profiles.batch),
        contract.TEXT_LEN_DIM: tuple(int(v) for v in profiles.text_len),
        contract.IMAGE_TOKENS_DIM: tuple(int(v) for v in profiles.image_tokens),
    }
    validate_dim_ranges(ranges)
    return ranges


def dim_ranges_from_manifest(manifest: Manifest) -> dict[str, DimRange]:
    """The symbolic-dim ranges of every stage of a bundle, derived from what its manifest records: the transformer's
    (dim_ranges_from_profiles) and, where the bundle has those stages,

    - text encoder: past_len 0..prefix_tokens (a runtime encodes the template prefix once and sends its K/V as the
      past, or sends an empty past for a full forward), opt at the cached prefix; text_len as the transformer's (the
      new tokens: at most the longest prompt); total_len = past_len + text_len at min, opt and max, so the three
      profile points are shapes the graph can actually be given;
    - VAE decoder: latent_height / latent_width over the served resolutions divided by the VAE's scale factor, opt at
      the optimization resolution.

    Raises:
        NucleusExportError: a range is impossible, or a served resolution is off the VAE's latent grid.
    """
    ranges = dim_ranges_from_profiles(manifest.profiles)
    text_encoder = manifest.stages.get(contract.TEXT_ENCODER_GRAPH)
    if text_encoder is not None:
        prefix = int(text_encoder.config.get("prefix_tokens", 0))
        past = (0, prefix, prefix)
        ranges[contract.PAST_LEN_DIM] = past
        ranges[contract.TOTAL_LEN_DIM] = tuple(p + t for p, t in zip(past, ranges[contract.TEXT_LEN_DIM]))  # type: ignore[assignment]
    vae = manifest.stages.get(contract.VAE_DECODER_GRAPH)
    if vae is not None:
        scale = int(vae.config["scale_factor"])
        profiles = manifest.profiles
        off_grid = [f"{h}x{w}" for h, w in profiles.resolutions if h % scale or w % scale]
        if off_grid:
            raise NucleusExportError(
                f"resolutions {', '.join(off_grid)} are not multiples of the VAE's scale factor {scale}.",
                f"serve resolutions whose sides are multiples of {scale} (--resolutions).",
            )
        for dim, axis in ((contract.LATENT_HEIGHT_DIM, 0), (contract.LATENT_WIDTH_DIM, 1)):
            sides = [r[axis] // scale for r in profiles.resolutions]
            ranges[dim] = (min(sides), profiles.opt_resolution[axis] // scale, max(sides))
    validate_dim_ranges(ranges)
    return ranges


# ---- limits of TensorRT a profile must respect ---------------------------------------------------------------------

# TopK's largest K ("K exceeds the maximum value allowed (3840)"); the router's K is the expert capacity C.
TOPK_MAX_K = 3840
# Largest element count of one tensor (int32 volume).
MAX_TENSOR_ELEMENTS = 2**31 - 1


def profile_limit_problems(config: ModelConfig, batch: int, tokens: int, text_len: int, float32: bool,
                           combine: str | None) -> list[str]:
    """What TensorRT cannot build at this size (empty when it fits). `combine` is the native combine formulation
    (None for plugins); `float32` engines decompose attention and so materialize its scores."""
    problems = []
    experts = config.num_experts
    for idx in config.moe_layers:
        c = config.capacity(idx, tokens)
        if combine is not None and c > TOPK_MAX_K:  # the native router's TopK (plugins route without it)
            problems.append(f"block {idx}: expert capacity C={c} exceeds TensorRT's TopK limit K <= {TOPK_MAX_K}")
        if combine == "onehot" and batch * tokens * experts * c > MAX_TENSOR_ELEMENTS:
            problems.append(f"block {idx}: the one-hot combine tensor [{batch}, {tokens}, {experts * c}] exceeds 2^31 elements")
        if experts * batch * c * 2 * config.moe_intermediate_dim > MAX_TENSOR_ELEMENTS:
            problems.append(f"block {idx}: the expert activations [{experts}, {batch * c}, {2 * config.moe_intermediate_dim}] "
                            "exceed 2^31 elements")
    scores = batch * config.num_attention_heads * tokens * (tokens + text_len)
    if float32 and scores > MAX_TENSOR_ELEMENTS:
        problems.append(f"float32 attention (decomposed) scores [{batch}, {config.num_attention_heads}, {tokens}, "
                        f"{tokens + text_len}] exceed 2^31 elements")
    return problems


def check_profile_limits(config: ModelConfig, profiles: Profiles, float32: bool, combine: str | None) -> None:
    """Refuse, before any export or build work, a profile TensorRT cannot build: the reason at the largest served
    resolution and the largest served resolution (and square size) that fits.

    Raises:
        NucleusExportError: some served resolution exceeds a limit.
    """
    batch, text_len = profiles.batch[2], profiles.text_len[2]

    def problems(tokens: int) -> list[str]:
        return profile_limit_problems(config, batch, tokens, text_len, float32, combine)

    failing = [(r, g) for r, g in zip(profiles.resolutions, profiles.grids) if problems(g[0] * g[1])]
    if not failing:
        return
    (height, width), grid = max(failing, key=lambda item: item[1][0] * item[1][1])
    fitting = [r for r, g in zip(profiles.resolutions, profiles.grids) if not problems(g[0] * g[1])]
    side = max((n for n in range(1, 4096) if not problems(n * n)), default=0)  # problems grow with S: one boundary
    step = 8 * config.patch_size
    best = max(fitting, key=lambda r: r[0] * r[1], default=None)
    served = f"the largest served resolution that fits is {best[0]}x{best[1]}; " if best else ""
    raise NucleusExportError(
        f"TensorRT cannot build {height}x{width} (batch {batch}): " + "; ".join(problems(grid[0] * grid[1])[:3]) + ".",
        f"{served}square sizes fit up to {side * step}x{side * step}: drop the larger --resolutions"
        + ("" if combine != "onehot" else ", or use --combine chain") + ".",
    )


def check_vae_limits(profiles: Profiles, scale_factor: int) -> None:
    """Refuse, before any work, served resolutions whose VAE decoder TensorRT cannot build: its mid-block attention
    has one head over every latent pixel, so its scores [batch, N, N] (N = latent height x width, no fused kernel
    for a head that wide: docs/vae_decoder.md) must stay within 2^31 elements.

    Raises:
        NucleusExportError: some served resolution exceeds the limit.
    """
    batch = profiles.batch[2]
    too_big = [(h, w) for h, w in profiles.resolutions if batch * ((h // scale_factor) * (w // scale_factor)) ** 2 > MAX_TENSOR_ELEMENTS]
    if not too_big:
        return
    h, w = max(too_big, key=lambda r: r[0] * r[1])
    pixels = int((MAX_TENSOR_ELEMENTS / batch) ** 0.5)  # latent pixels that fit
    raise NucleusExportError(
        f"TensorRT cannot build the VAE decoder at {h}x{w} (batch {batch}): its attention scores "
        f"[{batch}, {(h // scale_factor) * (w // scale_factor)}, {(h // scale_factor) * (w // scale_factor)}] exceed 2^31 elements.",
        f"serve resolutions of at most {pixels * scale_factor ** 2 / 1e6:.2f} MP at batch {batch} (--resolutions, "
        "--max-batch), or leave vae_decoder out of --stages.",
    )
