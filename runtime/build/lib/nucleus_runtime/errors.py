"""The error every user-facing failure raises: what is wrong, where, and how to fix it."""

from __future__ import annotations


class NucleusError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits with 1.

    Args:
        problem: what is wrong, naming the file or value involved.
        fix: what the user should do about it.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)
