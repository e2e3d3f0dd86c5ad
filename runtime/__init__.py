"""nucleus_runtime: run a nucleus-export bundle with numpy and an inference backend (ONNX Runtime or TensorRT).

This package never imports torch or diffusers.
"""

__version__ = "0.1.0"
