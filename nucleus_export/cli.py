"""`nucleus-export` command line: one subcommand per module in nucleus_export/commands.

Exit codes: 0 success, 1 failure (one-line error; traceback with --verbose), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nucleus_export import __version__
from nucleus_export.errors import UsageError
from nucleus_export.log import console, setup_logging
from nucleus_runtime.errors import NucleusError

# Each module defines `register(subparsers)`, which adds its parser and sets `func` to a callable(args) -> int.
COMMAND_MODULES = ("inspect", "export", "check", "build", "run", "triton", "generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nucleus-export",
        description="Export the Nucleus-Image MoE diffusion transformer to ONNX and TensorRT, run it, check it.",
    )
    parser.add_argument("--version", action="version", version=f"nucleus-export {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks on errors")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        if args.verbose:
            console.print_exception()
        print(f"nucleus-export {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NucleusError as exc:
        if args.verbose:
            console.print_exception()
        print(f"nucleus-export {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: still one line unless --verbose
        if args.verbose:
            console.print_exception()
        print(
            f"nucleus-export {args.command}: internal error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
