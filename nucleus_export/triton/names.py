"""Model names in a generated repository and the rules Triton puts on them.

A Triton model name is the name of its folder in the repository, the `name` field of its config.pbtxt, a path
segment of the HTTP endpoint `/v2/models/<name>/infer`, and (for Python models) part of shared-memory region names.
Triton itself only insists that the folder and the config agree; we accept the set of names that is safe in all four
places (letters, digits, `_`, `-` and `.`, not leading with `.` or `-`), so that a name that generates also serves.
"""

from __future__ import annotations

import dataclasses
import re

from nucleus_export.errors import UsageError

TEXT_KV_MODEL = "nucleus_text_kv"
DENOISER_MODEL = "nucleus_denoiser"
PIPELINE_MODEL = "nucleus_pipeline"

# 128 keeps names well inside file-name and shared-memory-name limits with the prefixes Triton adds.
MAX_NAME_LENGTH = 128
_VALID_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def validate_model_name(name: str) -> str:
    """Return `name` unchanged if Triton can serve a model under it; raise UsageError naming the rule broken."""
    if not name:
        raise UsageError("a Triton model name is empty.", "give each model a non-empty name.")
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"model name '{name[:40]}...' is {len(name)} characters long; the limit here is {MAX_NAME_LENGTH}.",
            "use a shorter --name-prefix.",
        )
    if not _VALID_NAME.fullmatch(name):
        raise UsageError(
            f"'{name}' is not a valid Triton model name: a model name is a folder name and a URL path segment "
            "(/v2/models/<name>), so it may hold only letters, digits, '_', '-' and '.', and may not start with "
            "'.' or '-'.",
            "choose a --name-prefix made of letters, digits and '_' (for example 'fp8_').",
        )
    return name


@dataclasses.dataclass(frozen=True)
class ModelNames:
    """The three model names of one repository; a prefix lets several bundles share one Triton server."""

    text_kv: str = TEXT_KV_MODEL
    denoiser: str = DENOISER_MODEL
    pipeline: str = PIPELINE_MODEL

    @classmethod
    def with_prefix(cls, prefix: str = "") -> ModelNames:
        names = cls(prefix + TEXT_KV_MODEL, prefix + DENOISER_MODEL, prefix + PIPELINE_MODEL)
        names.validate()
        return names

    def validate(self) -> None:
        for name in (self.text_kv, self.denoiser, self.pipeline):
            validate_model_name(name)
        if len({self.text_kv, self.denoiser, self.pipeline}) != 3:
            raise UsageError(
                f"model names must differ; got {self.text_kv}, {self.denoiser}, {self.pipeline}.",
                "give each model its own name.",
            )
