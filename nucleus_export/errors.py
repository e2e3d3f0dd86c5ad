"""Errors of the export side; they share the runtime's base so the CLI handles both alike."""

from __future__ import annotations

from nucleus_runtime.errors import NucleusError


class NucleusExportError(NucleusError):
    """A failure of export, build or check that the user can act on (exit code 1)."""


class UsageError(NucleusExportError):
    """Bad command-line usage (exit code 2)."""
