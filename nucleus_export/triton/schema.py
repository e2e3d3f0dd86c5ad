"""Parse config.pbtxt text with Triton's own `inference.ModelConfig` protobuf schema.

tritonclient ships the generated `model_config_pb2` inside `tritonclient.grpc`, whose package `__init__` refuses to
import without the grpc extra. The schema module itself needs only protobuf, so when the package import fails we
load the file directly. tritonclient is optional (`pip install nucleus-export[triton]`): without it, `available()`
is False and nothing here is required to generate a repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from nucleus_export.errors import NucleusExportError

_MODULE_NAME = "tritonclient.grpc.model_config_pb2"


def load_model_config_pb2() -> ModuleType | None:
    """tritonclient's model_config_pb2 module, or None when tritonclient is not installed."""
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    try:
        return importlib.import_module(_MODULE_NAME)
    except ImportError:
        pass
    except RuntimeError:  # tritonclient.grpc without grpcio raises RuntimeError from its __init__
        pass
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = f"{root}/grpc/model_config_pb2.py"
        try:
            file_spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
            if file_spec is None or file_spec.loader is None:
                continue
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        except (FileNotFoundError, ImportError):
            continue
        sys.modules[_MODULE_NAME] = module
        return module
    return None


def available() -> bool:
    return load_model_config_pb2() is not None


def parse_model_config(text: str, source: str = "config.pbtxt") -> Any:
    """The `inference.ModelConfig` message of a config.pbtxt; a NucleusExportError if Triton's schema rejects it."""
    pb2 = load_model_config_pb2()
    if pb2 is None:
        raise NucleusExportError(
            "tritonclient is not installed, so config.pbtxt cannot be checked against Triton's schema.",
            "pip install 'nucleus-export[triton]'.",
        )
    from google.protobuf import text_format

    message = pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise NucleusExportError(
            f"{source} does not parse as a Triton ModelConfig: {exc}.",
            "this is a bug in nucleus-export's Triton config generator; please report it with the bundle's manifest.json.",
        ) from None
    return message
