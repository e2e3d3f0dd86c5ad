"""The bundle contract, one definition per fact: graph, tensor and dimension names, the text K/V layout, the
`nucleus` custom ops and their plugins, the expert capacity rule, GEMM precision modes, precision labels, backend
names and every bundle file name.

Everything that produces or consumes a bundle (graph builders, MoE lowering, engine builds, parity, runtime
backends, the Triton model, the plugin checks) imports these names instead of spelling them. numpy-free and
torch-free on purpose: the plugin checks load this file on machines where nothing else of the project is installed.
The prose specification, with the op semantics, is docs/contract.md.
"""

from __future__ import annotations

import enum
import math
from fractions import Fraction

# -- stages (one graph each) -------------------------------------------------------------------------------------
TEXT_ENCODER_GRAPH = "text_encoder"  # token ids -> prompt embeddings (Qwen3-VL's language model, truncated)
TEXT_KV_GRAPH = "text_kv"  # prompt embeddings -> per-block text K/V
DENOISER_GRAPH = "denoiser"  # one transformer forward
VAE_DECODER_GRAPH = "vae_decoder"  # latents -> uint8 RGB image
# Every bundle holds the transformer's two stages; a bundle of a pipeline root may add the text encoder and the VAE
# decoder. STAGES is the execution order.
GRAPHS = (TEXT_KV_GRAPH, DENOISER_GRAPH)
OPTIONAL_STAGES = (TEXT_ENCODER_GRAPH, VAE_DECODER_GRAPH)
STAGES = (TEXT_ENCODER_GRAPH, TEXT_KV_GRAPH, DENOISER_GRAPH, VAE_DECODER_GRAPH)

# -- tensors -----------------------------------------------------------------------------------------------------
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TXT_ROPE_COS = "txt_rope_cos"
TXT_ROPE_SIN = "txt_rope_sin"
TEXT_KV = "text_kv"  # text_kv's output and the denoiser's input: [L, 2, B, T, Hkv, Dh]
HIDDEN_STATES = "hidden_states"
TIMESTEP = "timestep"  # the value diffusers' transformer forward receives: t / num_train_timesteps
IMG_ROPE_COS = "img_rope_cos"
IMG_ROPE_SIN = "img_rope_sin"
ENCODER_HIDDEN_STATES_MASK = "encoder_hidden_states_mask"
SAMPLE = "sample"

# text_encoder: input_ids [B, T] int64, attention_mask [B, P + T] int64 over [past ; new] (1 real, 0 padding),
# past_key_values [L, 2, B, P, Hkv, Dh] (K after k_norm and RoPE, V; P may be 0) -> prompt_embeds [B, T, D] float32
# (hidden_states[return_index]) and key_values [L, 2, B, T, Hkv, Dh] of the new tokens (a runtime caches the fixed
# system-prompt prefix's and passes them as past_key_values).
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
PAST_KEY_VALUES = "past_key_values"
PROMPT_EMBEDS = "prompt_embeds"
KEY_VALUES = "key_values"
# vae_decoder: latents [B, z_dim, h, w] float32 (unpacked, still normalized) -> image [B, H, W, 3] uint8
LATENTS = "latents"
IMAGE = "image"

TEXT_ENCODER_INPUTS = (INPUT_IDS, ATTENTION_MASK, PAST_KEY_VALUES)
TEXT_KV_INPUTS = (ENCODER_HIDDEN_STATES, TXT_ROPE_COS, TXT_ROPE_SIN)
DENOISER_INPUTS = (HIDDEN_STATES, TIMESTEP, IMG_ROPE_COS, IMG_ROPE_SIN, TEXT_KV, ENCODER_HIDDEN_STATES_MASK)

# Host-side element types of every input fed from numpy (text_kv itself is in the graph's compute dtype, which the
# manifest records). Names are numpy/ONNX type names.
HOST_INPUT_DTYPES = {
    ENCODER_HIDDEN_STATES: "float32",
    TXT_ROPE_COS: "float32",
    TXT_ROPE_SIN: "float32",
    HIDDEN_STATES: "float32",
    TIMESTEP: "float32",
    IMG_ROPE_COS: "float32",
    IMG_ROPE_SIN: "float32",
    ENCODER_HIDDEN_STATES_MASK: "int64",
    SAMPLE: "float32",
    INPUT_IDS: "int64",
    ATTENTION_MASK: "int64",
    LATENTS: "float32",
}


def block_output(index: int) -> str:
    """The denoiser's residual stream [B, S, hidden] float32 after block `index`: a stable name, so the graph can be
    cut into segments of consecutive blocks at these tensors."""
    return f"transformer_blocks.{index}.output"


# -- dimension names (symbolic axes of the graphs and the engine profiles) ---------------------------------------
BATCH_DIM = "batch"
IMAGE_TOKENS_DIM = "image_tokens"
TEXT_LEN_DIM = "text_len"
PAST_LEN_DIM = "past_len"  # text_encoder: tokens already encoded (0 for a full forward)
TOTAL_LEN_DIM = "total_len"  # text_encoder: past_len + text_len, what its attention mask covers
LATENT_HEIGHT_DIM = "latent_height"  # vae_decoder: the latent grid (patch grid x patch size)
LATENT_WIDTH_DIM = "latent_width"
HEIGHT_DIM = "height"  # vae_decoder's output pixels
WIDTH_DIM = "width"
# Dims whose profile may start at 0 (an empty past: the text encoder's full forward).
ZERO_ALLOWED_DIMS = (PAST_LEN_DIM,)

Dim = int | str  # a size, or a symbolic dimension name


def text_kv_shape(num_layers: int, batch: Dim, text_len: Dim, kv_heads: int, head_dim: int) -> tuple[Dim, ...]:
    """[L, 2, B, T, Hkv, Dh]: per block the text keys (index 0 of axis 1, after norm and RoPE) and values (1)."""
    return (num_layers, 2, batch, text_len, kv_heads, head_dim)


# -- graphs' ONNX form ---------------------------------------------------------------------------------------------
# 23: the standard Attention, RMSNormalization and RotaryEmbedding ops, which TensorRT parses into fused layers.
ONNX_OPSET = 23
# Tensors below this many bytes stay inside the graph proto even when weights go to external data.
INLINE_TENSOR_MAX_BYTES = 1024

# -- the `nucleus` custom ops and their TensorRT plugins ---------------------------------------------------------
DOMAIN = "nucleus"
DOMAIN_VERSION = 1
ROUTER_OP = "ExpertChoiceRouter"
COMBINE_OP = "MoECombine"
CUSTOM_OPS = (ROUTER_OP, COMBINE_OP)
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = "1"
PLUGIN_LIBRARY_NAME = "libnucleus_trt_plugins.so"
PLUGIN_LIBRARY_PATH = f"plugins/{PLUGIN_LIBRARY_NAME}"  # where a bundle ships it

# ExpertChoiceRouter attributes
ATTR_CAPACITY_NUMERATOR = "capacity_numerator"
ATTR_CAPACITY_DENOMINATOR = "capacity_denominator"
ATTR_SCORE_FUNCTION = "score_function"
ATTR_ROUTE_SCALE = "route_scale"
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Added to the per-token gating sum before dividing, as diffusers does, so a token no expert chose cannot divide by 0.
GATING_EPS = 1e-12

# How an engine computes the MoE ops (manifest engine records, `lowering.moe`): native TensorRT layers, or the plugins.
# The exported ONNX always carries the custom nodes with their function bodies.
MOE_NATIVE = "native"
MOE_PLUGIN = "plugin"
MOE_LOWERINGS = (MOE_NATIVE, MOE_PLUGIN)
# The native combine's formulations (`lowering.combine`): a one-hot GEMM, or a per-expert gather-add-scatter chain.
COMBINE_ONEHOT = "onehot"
COMBINE_CHAIN = "chain"
COMBINE_FORMULATIONS = (COMBINE_ONEHOT, COMBINE_CHAIN)


# -- the capacity rule -------------------------------------------------------------------------------------------
def capacity_from_factor(capacity_factor: float, image_tokens: int, num_experts: int) -> int:
    """Tokens each expert takes per batch row, exactly as diffusers computes it (float arithmetic included)."""
    return max(1, math.ceil(capacity_factor * image_tokens / num_experts))


def capacity(numerator: int, denominator: int, image_tokens: int, num_experts: int) -> int:
    """C = max(1, ceil(num * S / (den * E))) in integer arithmetic: what graphs, lowerings and plugins compute."""
    if min(numerator, denominator, image_tokens, num_experts) <= 0:
        raise ValueError("capacity numerator, denominator, tokens and experts must all be positive")
    return max(1, -(-numerator * image_tokens // (denominator * num_experts)))


def capacity_fits(capacity_tokens: int, image_tokens: int) -> bool:
    """Each expert picks C distinct tokens of a row, so C <= S (diffusers' topk fails otherwise)."""
    return capacity_tokens <= image_tokens


def capacity_fraction(capacity_factor: float, num_experts: int, max_image_tokens: int) -> tuple[int, int] | None:
    """The capacity factor as an integer fraction (num, den) whose integer rule equals diffusers' float formula for
    every S up to max_image_tokens; None where no short fraction does."""
    frac = Fraction(capacity_factor).limit_denominator(1 << 16)
    num, den = frac.numerator, frac.denominator
    if num <= 0:
        return None
    for tokens in range(1, max_image_tokens + 1):
        if capacity(num, den, tokens, num_experts) != capacity_from_factor(capacity_factor, tokens, num_experts):
            return None
    return num, den


# -- precision ---------------------------------------------------------------------------------------------------
COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16")


class GemmMode(str, enum.Enum):
    """How one GEMM computes in a quantized build (values as recipe files store them)."""

    COMPUTE = "compute"  # weights and activations in the compute precision
    FP8_WEIGHTS = "fp8-weights"  # E4M3 weights (per output channel), activations in the compute precision: W8A16
    FP8 = "fp8"  # E4M3 weights and E4M3 activations (per-tensor calibrated scale): W8A8

    @property
    def quantizes_weights(self) -> bool:
        return self is not GemmMode.COMPUTE

    @property
    def quantizes_activations(self) -> bool:
        return self is GemmMode.FP8


# The quantization scheme a manifest records, and the marker it adds to precision labels.
FP8_SCHEME = "fp8_e4m3"
SCHEME_SUFFIXES = {FP8_SCHEME: "+fp8"}


def precision_label(compute: str, scheme: str | None) -> str:
    """'bf16', 'bf16+fp8', ...: the compute precision plus the marker of the quantization scheme, if any."""
    return compute + SCHEME_SUFFIXES[scheme] if scheme else compute


# -- backends ----------------------------------------------------------------------------------------------------
# One spelling everywhere: CLI choices, manifest engine records (`flavor`), runtime backend names, Triton parameters.
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
TENSORRT_RTX = "tensorrt-rtx"
AUTO = "auto"
# The runtime's own distribution; its extras are named after the backends (`pip install 'nucleus-runtime[tensorrt]'`).
RUNTIME_DISTRIBUTION = "nucleus-runtime"
# The Python module each TensorRT flavor is imported as (its plans deserialize only in the library that built them).
TENSORRT_MODULES = {TENSORRT: "tensorrt", TENSORRT_RTX: "tensorrt_rtx"}

# -- files -------------------------------------------------------------------------------------------------------
MANIFEST_NAME = "manifest.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# The text_encoder stage's tokenizer (the processor's `tokenizers` backend) and prompt template (the chat template as
# prefix + prompt + suffix, with the padding and truncation rules): nucleus_runtime.tokenizer reads both.
TOKENIZER_FILE = "tokenizer.json"
PROMPT_TEMPLATE_FILE = "prompt_template.json"
# The quantization recipe (activation scales and per-GEMM modes); `build --fp8-scales` takes it back.
QUANT_RECIPE_NAME = "fp8_scales.json"
# The quality report (`check`, `build`) and the engine build log.
PARITY_NAME = "parity.json"
BUILD_LOG_NAME = "build_log.json"
# Protobuf cannot serialize a model over 2 GB: weights of larger graphs go to `<graph>.onnx.data`.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# Hard links to the checkpoint's safetensors shards: graph weights stored as the checkpoint stores them point into
# these files (ONNX external data with offsets) instead of being copied (docs/contract.md).
CHECKPOINT_LINKS_DIR = "checkpoint"


def checkpoint_links_dir(graph: str) -> str:
    """Where a graph's linked shards go: the transformer's graphs share checkpoint/, each pipeline component has its
    own checkpoint/<stage>/ (so shards of two components with the same file name never collide)."""
    return f"{CHECKPOINT_LINKS_DIR}/{graph}" if graph in OPTIONAL_STAGES else CHECKPOINT_LINKS_DIR


EXTERNAL_DATA_SUFFIX = ".onnx.data"


def external_data_file(graph: str) -> str:
    return graph + EXTERNAL_DATA_SUFFIX


def is_weight_data(relpath: str) -> bool:
    """Whether a bundle file holds graph weights: a graph's data file or a linked checkpoint shard."""
    return relpath.endswith(EXTERNAL_DATA_SUFFIX) or relpath.startswith(CHECKPOINT_LINKS_DIR + "/")


# -- segments (consecutive block / layer groups built and run as separate engines; docs/contract.md) -------------
# Graph metadata key: JSON list of the residual-stream tensor after each block or layer (where a graph may be cut).
BLOCK_OUTPUTS_METADATA = "nucleus.block_outputs"


# What a segment of consecutive layers [first, last) reads and writes of the tensors stacked over every layer on
# axis 0: each such input is sliced to the segment's layers (a runtime passes tensor[first:last], on the GPU a pointer
# offset), and each such output holds only the segment's layers (a runtime writes it at offset `first` of one buffer
# of all layers). Per stage that can be cut: the denoiser reads text_kv; the text encoder reads the past K/V and
# writes the new tokens' K/V.
SEGMENT_SLICED_INPUTS: dict[str, tuple[str, ...]] = {DENOISER_GRAPH: (TEXT_KV,), TEXT_ENCODER_GRAPH: (PAST_KEY_VALUES,)}
SEGMENT_SLICED_OUTPUTS: dict[str, tuple[str, ...]] = {DENOISER_GRAPH: (), TEXT_ENCODER_GRAPH: (KEY_VALUES,)}


def segment_name(graph: str, index: int) -> str:
    """'denoiser.seg0', 'text_encoder.seg1': the stem of a segment's ONNX graph and engine files."""
    return f"{graph}.seg{index}"


def graph_of_unit(unit: str) -> str:
    """The graph an engine unit belongs to: 'denoiser' for 'denoiser' and for its segments 'denoiser.seg<k>'."""
    return unit.split(".", 1)[0]


def onnx_file(graph: str) -> str:
    return f"{graph}.onnx"


# The graph an engine was built from (MoE lowered, masks as TensorRT takes them), kept beside the exported graph.
ENGINE_ONNX_SUFFIX = ".engine.onnx"


def engine_onnx_file(unit: str) -> str:
    return unit + ENGINE_ONNX_SUFFIX


PLAN_SUFFIX = ".plan"


def plan_file(graph: str) -> str:
    return graph + PLAN_SUFFIX
