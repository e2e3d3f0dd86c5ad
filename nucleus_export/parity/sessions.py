"""ONNX Runtime CPU sessions for the parity checks, opened from a path or from a graph held in memory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from nucleus_runtime.contract import EXTERNAL_DATA_THRESHOLD_BYTES

if TYPE_CHECKING:
    import onnxruntime


def cpu_session(model: onnx.ModelProto | Path, directory: Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU session; a ModelProto is saved next to the bundle's graphs first, so relative external data resolves."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No arena and no memory patterns: one block of the real model materializes attention scores of ~1.1 GB per batch
    # row, and an arena sized for every variant's peak would stay held between the report's sessions.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    fd, tmp = tempfile.mkstemp(suffix=".onnx", prefix=".parity-", dir=directory)
    os.close(fd)
    try:
        onnx.save_model(model, tmp, save_as_external_data=model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES, location=Path(tmp).name + ".data")
        return ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp + ".data").unlink(missing_ok=True)
