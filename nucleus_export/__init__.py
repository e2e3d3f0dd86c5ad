"""nucleus-export: deploy the Nucleus-Image MoE diffusion transformer with ONNX, TensorRT and Triton."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["EngineTransformer", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: EngineTransformer imports torch and diffusers, which the CLI's light commands should not pay for.
    if name == "EngineTransformer":
        from nucleus_export.integrations.engine_transformer import EngineTransformer

        return EngineTransformer
    raise AttributeError(f"module 'nucleus_export' has no attribute {name!r}")
