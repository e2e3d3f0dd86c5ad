"""FP8 (E4M3) quantization: activation calibration on the PyTorch reference; weights are quantized at export."""

from nucleus_export.quant.calibrate import calibrate_fp8, load_calibration_prompts

__all__ = ["calibrate_fp8", "load_calibration_prompts"]
