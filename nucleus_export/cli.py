"""`nucleus-export` command line: one subcommand per module in nucleus_export/commands.

Exit codes: 0 success, 1 failure (one-line error; traceback with --verbose), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nucleus_runtime.atomic import Terminated
from nucleus_runtime.errors import NucleusError

from nucleus_export import __version__
from nucleus_export.errors import UsageError
from nucleus_export.log import console, setup_logging

# Each module defines `register(subparsers)`, which adds its parser and sets `func` to a callable(args) -> int.
COMMAND_MODULES = ("inspect", "export", "check", "build", "run", "triton", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-export",
        description="Export the Nucleus-Image MoE diffusion transformer to ONNX and TensorRT, run it, check it.",
    )
    parser.add_argument("--version", action="version", version=f"nucleus-export {__version__}")
    verbose_help = "debug logs and tracebacks on errors"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without -v must not reset a -v given before it.
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nucleus_export.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nucleus_export.commands.{name}":
                raise
            continue
        module.register(sub, common)
    return parser


def _error(command: str | None, exc: object, verbose: bool, kind: str = "error") -> None:
    if verbose:
        console.print_exception()
    print(f"nucleus-export{' ' + command if command else ''}: {kind}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except NucleusError as exc:  # an argument type (e.g. --resolutions) refused its value
        _error(None, exc, "-v" in argv or "--verbose" in argv)
        return 2
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        _error(args.command, exc, args.verbose)
        return 2
    except NucleusError as exc:
        _error(args.command, exc, args.verbose)
        return 1
    except Terminated as exc:  # SIGTERM: partial outputs were removed on the way out (nucleus_runtime.atomic)
        print(f"nucleus-export {args.command}: terminated (signal {exc.signum}); nothing was left half-written",
              file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"nucleus-export {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: still one line unless --verbose
        _error(args.command, f"{type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", args.verbose,
               "internal error")
        return 1


if __name__ == "__main__":
    sys.exit(main())
