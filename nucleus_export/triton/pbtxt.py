"""A Triton model configuration as data, and its config.pbtxt text.

Only the fields the generated repository uses are modelled. The text is written by hand rather than through
tritonclient's protobuf classes so that generating a repository needs no Triton package; the tests parse every
generated file with Triton's own `ModelConfig` schema (see `schema.py`), which is what keeps this honest.
"""

from __future__ import annotations

import dataclasses
import json

# ONNX element type names as the manifest records them -> Triton data types.
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",  # Triton's bytes type: numpy object arrays of bytes (prompts, PNG files)
}

KIND_GPU = "KIND_GPU"
KIND_CPU = "KIND_CPU"


@dataclasses.dataclass(frozen=True)
class TensorConfig:
    """One model input or output. `dims` is the full shape (max_batch_size is 0), -1 where the size varies."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class InstanceGroup:
    kind: str
    count: int = 1


@dataclasses.dataclass(frozen=True)
class QueuePolicy:
    """How long a request may wait in the model's queue before Triton rejects it (0: wait without limit)."""

    timeout_us: int


@dataclasses.dataclass
class TritonModelConfig:
    """The subset of Triton's `inference.ModelConfig` that the generated models set.

    Exactly one of `platform` (tensorrt_plan) and `backend` (onnxruntime, python) is set, as Triton's docs do it.
    """

    name: str
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    instance_group: InstanceGroup
    platform: str | None = None
    backend: str | None = None
    max_batch_size: int = 0
    default_model_filename: str | None = None
    queue_policy: QueuePolicy | None = None
    # Decoupled transaction policy: any number of responses per request (the pipeline's progress stream); clients
    # then use gRPC streaming (Triton's HTTP infer endpoint refuses decoupled models).
    decoupled: bool = False
    parameters: dict[str, str] = dataclasses.field(default_factory=dict)
    comment: str | None = None

    def to_pbtxt(self) -> str:
        lines: list[str] = []
        if self.comment:
            lines += [f"# {line}".rstrip() for line in self.comment.splitlines()]
        lines.append(f"name: {_quote(self.name)}")
        if self.platform:
            lines.append(f"platform: {_quote(self.platform)}")
        if self.backend:
            lines.append(f"backend: {_quote(self.backend)}")
        lines.append(f"max_batch_size: {self.max_batch_size}")
        if self.default_model_filename:
            lines.append(f"default_model_filename: {_quote(self.default_model_filename)}")
        lines += _tensor_block("input", self.inputs)
        lines += _tensor_block("output", self.outputs)
        lines += [
            "instance_group [",
            "  {",
            f"    count: {self.instance_group.count}",
            f"    kind: {self.instance_group.kind}",
            "  }",
            "]",
        ]
        if self.queue_policy is not None:
            # With max_batch_size 0 the dynamic batcher forms no batches; it is the scheduler that owns the queue
            # policy, which is what this block is for.
            lines += [
                "dynamic_batching {",
                "  default_queue_policy {",
                "    timeout_action: REJECT",
                f"    default_timeout_microseconds: {self.queue_policy.timeout_us}",
                "    allow_timeout_override: true",
                "  }",
                "}",
            ]
        if self.decoupled:
            lines += ["model_transaction_policy {", "  decoupled: true", "}"]
        for key, value in self.parameters.items():
            lines += ["parameters {", f"  key: {_quote(key)}", f"  value {{ string_value: {_quote(value)} }}", "}"]
        return "\n".join(lines) + "\n"


def _tensor_block(field: str, tensors: list[TensorConfig]) -> list[str]:
    if not tensors:
        return []
    lines = [f"{field} ["]
    for i, t in enumerate(tensors):
        lines += [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
        ]
        if t.optional:
            lines.append("    optional: true")
        lines.append("  }," if i < len(tensors) - 1 else "  }")
    lines.append("]")
    return lines


def _quote(text: str) -> str:
    # Protobuf text format accepts C-style escapes in double quotes; JSON's escaping is a subset of them.
    return json.dumps(text, ensure_ascii=True)
