"""A NucleusMoEImagePipeline folder of tiny random components of the real classes, built offline.

- text encoder: transformers' Qwen3VLForConditionalGeneration with a tiny config (hidden size = the tiny
  transformer's joint_attention_dim; 9 layers, since the pipeline reads hidden_states[-8]);
- processor: transformers' Qwen3VLProcessor around a character-level WordLevel tokenizer (tokenizers) with Qwen's
  special tokens and a ChatML chat template;
- VAE: diffusers' AutoencoderKLQwenImage with a small base width (same downsampling: 8x, 16 latent channels);
- transformer: the embedded tiny model (nucleus_export/model/tiny.py); scheduler: the runtime's default config.

A second variant ("other") changes every axis the runtime must not assume: six experts with sigmoid routing and MHA
in the transformer, a 48-wide MHA text encoder with attention biases and head_dim x heads != hidden, a 4x VAE with
non-trivial latent statistics, and a processor that pads on the left.

Saved with the pipeline's own save_pretrained, so it loads through NucleusMoEImagePipeline.from_pretrained.

transformers gates Qwen3VLProcessor's video processor on torchvision, whose PyPI wheels are CUDA builds that cannot
load next to the CPU torch of these machines; `allow_processor_without_torchvision` lets transformers find the
(torch-only) video processor classes so the real processor class loads. Only text goes through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nucleus_export.model.tiny import MEDIUM_CONFIG

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SEED = 0


@dataclasses.dataclass(frozen=True)
class ToyVariant:
    name: str
    transformer: dict[str, Any]  # overrides of nucleus_export.model.tiny.TINY_CONFIG
    text_encoder: dict[str, Any]  # overrides of the Qwen3-VL text config below
    vae: dict[str, Any]  # AutoencoderKLQwenImage arguments
    padding_side: str = "right"
    processor: str = "chars"  # "chars": the character-level tokenizer below; "bpe": tests/bpe_processor.py's


# The released QwenImage VAE's architecture (diffusers' AutoencoderKLQwenImage defaults), random weights.
REAL_VAE: dict[str, Any] = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}


VARIANTS = {
    "toy": ToyVariant("toy", {}, {}, {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}),
    "other": ToyVariant(
        "other",
        {"num_experts": 6, "use_sigmoid": True, "num_key_value_heads": 4, "joint_attention_dim": 48,
         "capacity_factors": [0.0, 0.0, 0.0, 3.0, 1.5]},
        {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 10, "num_attention_heads": 3,
         "num_key_value_heads": 3, "head_dim": 24, "attention_bias": True},
        {"base_dim": 12, "z_dim": 16, "dim_mult": [1, 2, 4], "num_res_blocks": 1, "temperal_downsample": [False, True],
         "latents_mean": [0.1 * (i % 5) - 0.2 for i in range(16)], "latents_std": [0.5 + 0.1 * (i % 7) for i in range(16)]},
        padding_side="left",
    ),
    # For benchmarks (benchmarks/bench_text_to_image.py), not tests: the medium transformer of nucleus_export.model.tiny,
    # a text encoder at a quarter of the real width with the real head_dim and vocabulary, the real VAE, and a
    # Qwen-like BPE processor with Qwen3-VL's chat template.
    "medium": ToyVariant(
        "medium",
        MEDIUM_CONFIG,
        {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 12,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128},
        REAL_VAE,
        processor="bpe",
    ),
}


@contextlib.contextmanager
def allow_processor_without_torchvision() -> Iterator[None]:
    """Let transformers build and load Qwen3VLProcessor when torchvision is absent (restored on exit)."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    from transformers import processing_utils

    video_utils = importlib.import_module("transformers.video_processing_utils")
    qwen3_video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    auto_video = importlib.import_module("transformers.models.auto.video_processing_auto")
    module = processing_utils.transformers_module
    had_mixin = "VideoProcessorMixin" in vars(module)
    original_loader = auto_video.AutoVideoProcessor.__dict__["from_pretrained"]

    def load_video_processor(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        return qwen3_video.Qwen3VLVideoProcessor.from_pretrained(path, *args, **kwargs)

    module.VideoProcessorMixin = video_utils.VideoProcessorMixin
    auto_video.AutoVideoProcessor.from_pretrained = classmethod(load_video_processor)
    try:
        yield
    finally:
        auto_video.AutoVideoProcessor.from_pretrained = original_loader
        if not had_mixin:
            del module.VideoProcessorMixin


def _processor(padding_side: str = "right", kind: str = "chars") -> tuple[Any, dict[str, int]]:
    """The processor and the ids of the special tokens the text encoder's config names."""
    if kind == "bpe":
        from bpe_processor import bpe_processor

        processor = bpe_processor(padding_side=padding_side)
        return processor, {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side=padding_side,
    )
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(),
        tokenizer=fast,
        video_processor=video.Qwen3VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    ), vocab


def _text_encoder(vocab: dict[str, int], text_dim: int, overrides: dict[str, Any]) -> Any:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text_config = {
        "vocab_size": max(vocab.values()) + 1,
        "hidden_size": text_dim,
        "intermediate_size": 2 * text_dim,
        "num_hidden_layers": 9,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": text_dim // 4,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **overrides,
    }
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": text_dim,
            "patch_size": 4, "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def write_toy_pipeline(out_dir: Path, variant: ToyVariant = VARIANTS["toy"]) -> Path:
    """Write a toy pipeline folder (model_index.json, transformer/, text_encoder/, processor/, vae/, scheduler/)."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        NucleusMoEImagePipeline,
    )
    from nucleus_runtime.scheduler import DEFAULT_SCHEDULER_CONFIG

    from nucleus_export.model.checkpoint import open_checkpoint
    from nucleus_export.model.reference import load_reference
    from nucleus_export.model.tiny import TINY_CONFIG, ensure_tiny_checkpoint, write_checkpoint

    torch.manual_seed(SEED)
    with allow_processor_without_torchvision():
        processor, vocab = _processor(variant.padding_side, variant.processor)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        transformer = (write_checkpoint(tmp / "tiny-transformer", variant.transformer, max_shard_size="4GB")
                       if variant.transformer else ensure_tiny_checkpoint())
        text_dim = {**TINY_CONFIG, **variant.transformer}["joint_attention_dim"]
        pipe = NucleusMoEImagePipeline(
            transformer=load_reference(open_checkpoint(transformer)),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(DEFAULT_SCHEDULER_CONFIG),
            vae=AutoencoderKLQwenImage(**variant.vae).eval(),
            text_encoder=_text_encoder(vocab, text_dim, variant.text_encoder),
            processor=processor,
        )
        try:
            shutil.rmtree(tmp / "tiny-transformer", ignore_errors=True)
            pipe.save_pretrained(tmp)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_toy_pipeline(variant: str = "toy") -> Path:
    """A toy pipeline in the test run's private model cache (NUCLEUS_EXPORT_CACHE), written on first use."""
    from nucleus_export.model.tiny import cache_root

    path = cache_root() / ("toy-nucleus-pipeline" if variant == "toy" else f"toy-nucleus-pipeline-{variant}")
    if not (path / "model_index.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_toy_pipeline(path, VARIANTS[variant])
    return path

