"""nucleus-export: deploy the Nucleus-Image MoE diffusion transformer with ONNX, TensorRT and Triton."""

__version__ = "0.1.0"
