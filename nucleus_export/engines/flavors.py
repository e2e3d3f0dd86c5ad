"""Which TensorRT flavor builds the engines: full TensorRT (`tensorrt`, datacenter GPUs) or TensorRT-RTX
(`tensorrt_rtx`, RTX/edge GPUs). Both expose the same Python builder API, so the rest of the build takes the module
as a value (`TensorRTFlavor.trt`) and has one code path.

Modules are imported lazily: the package imports without either, and the error names the extra to install.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from types import ModuleType

from nucleus_runtime.contract import AUTO, TENSORRT, TENSORRT_MODULES, TENSORRT_RTX
from nucleus_runtime.gpu import cuda_device_count

from nucleus_export.errors import NucleusExportError, UsageError

logger = logging.getLogger("nucleus_export")

FLAVOR_CHOICES = (AUTO, TENSORRT, TENSORRT_RTX)

@dataclasses.dataclass(frozen=True)
class TensorRTFlavor:
    """A resolved TensorRT flavor: its name, the imported module and facts the build depends on.

    Attributes:
        name: "tensorrt" or "tensorrt-rtx".
        trt: the imported module (`tensorrt` or `tensorrt_rtx`); same builder API.
        version: the module's version string.
        needs_gpu: full TensorRT builds by timing kernels on the GPU; TensorRT-RTX compiles ahead of time on the CPU.
        uses_timing_cache: TensorRT-RTX >= 1.2 turns timing-cache calls into no-ops (its AOT build does no timing).
    """

    name: str
    trt: ModuleType
    version: str

    @property
    def needs_gpu(self) -> bool:
        return self.name == TENSORRT

    @property
    def uses_timing_cache(self) -> bool:
        return self.name == TENSORRT


def install_hint(name: str) -> str:
    """The toolkit's extras are named after the flavors (pyproject [project.optional-dependencies]); they pull the
    runtime's extra of the same name, so the runtime distribution is installed from the checkout first."""
    return f"pip install './runtime[{name}]' '.[{name}]' (from the nucleus-export checkout)"


def _import(name: str) -> ModuleType | None:
    """Import a flavor's module, or None when it is not installed (any ImportError: a broken install counts)."""
    try:
        return importlib.import_module(TENSORRT_MODULES[name])
    except ImportError as exc:
        logger.debug("cannot import %s: %s", TENSORRT_MODULES[name], exc)
        return None


def _gpu_visible() -> bool:
    return cuda_device_count() > 0


def resolve_flavor(choice: str = AUTO) -> TensorRTFlavor:
    """Pick and import the TensorRT flavor for `build --backend`.

    auto: full TensorRT when it is installed and a GPU is visible (it needs one to build), else TensorRT-RTX (builds
    on the CPU), else an error naming both extras.

    Raises:
        UsageError: unknown choice.
        NucleusExportError: the chosen module is missing, or full TensorRT was chosen without a GPU.
    """
    if choice not in FLAVOR_CHOICES:
        raise UsageError(f"unknown backend '{choice}'.", f"use one of {', '.join(FLAVOR_CHOICES)}.")
    if choice == AUTO:
        if _gpu_visible():
            module = _import(TENSORRT)
            if module is not None:
                return TensorRTFlavor(TENSORRT, module, module.__version__)
        module = _import(TENSORRT_RTX)
        if module is not None:
            return TensorRTFlavor(TENSORRT_RTX, module, module.__version__)
        if _import(TENSORRT) is not None:
            raise NucleusExportError(
                "TensorRT is installed but no CUDA GPU is visible, and full TensorRT needs one to build engines; "
                "TensorRT-RTX (which builds on the CPU) is not installed.",
                f"run on a machine with an NVIDIA GPU, or {install_hint(TENSORRT_RTX)} to build RTX engines on the CPU.",
            )
        raise NucleusExportError(
            "no TensorRT is installed: building engines needs TensorRT (datacenter GPUs) or TensorRT-RTX (RTX GPUs).",
            f"{install_hint(TENSORRT_RTX)} (builds on the CPU) or {install_hint(TENSORRT)} (needs a GPU), "
            "or use `nucleus-export export` for ONNX only.",
        )
    module = _import(choice)
    if module is None:
        raise NucleusExportError(
            f"--backend {choice} was requested but the `{TENSORRT_MODULES[choice]}` module is not installed.",
            f"{install_hint(choice)}, or pick another --backend.",
        )
    flavor = TensorRTFlavor(choice, module, module.__version__)
    if flavor.needs_gpu and not _gpu_visible():
        raise NucleusExportError(
            "--backend tensorrt needs a CUDA GPU to build (full TensorRT times kernels on the device), and none is "
            "visible (no driver, no device, or CUDA_VISIBLE_DEVICES hides it).",
            f"run on a GPU machine, or use --backend tensorrt-rtx ({install_hint(TENSORRT_RTX)}), which builds on the CPU.",
        )
    return flavor
