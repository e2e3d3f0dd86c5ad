"""nucleus_runtime: run a nucleus-export bundle with numpy and an inference backend (ONNX Runtime or TensorRT).

This package never imports torch, diffusers or transformers: numpy, safetensors, tokenizers and an inference backend
(ONNX Runtime, TensorRT, TensorRT-RTX; `nucleus_runtime.backends.registry`). Backend libraries are imported only when
a backend is opened, so the package imports without any of them.
"""

from nucleus_runtime.backends.base import Backend, TensorHandle
from nucleus_runtime.bundle import Manifest, load_manifest, verify_files
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.latents import initial_noise, pack_latents, unpack_latents
from nucleus_runtime.pipeline import generate
from nucleus_runtime.scheduler import SchedulerConfig, make_schedule
from nucleus_runtime.text_kv_cache import CacheStats, TextKVCache, text_kv_key

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "CacheStats",
    "Manifest",
    "NucleusError",
    "SchedulerConfig",
    "TextKVCache",
    "TensorHandle",
    "generate",
    "initial_noise",
    "load_manifest",
    "make_schedule",
    "pack_latents",
    "text_kv_key",
    "unpack_latents",
    "verify_files",
]
