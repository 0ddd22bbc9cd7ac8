"""The `mnemo` command line: one entry point, a subcommand per job.

Each subsystem contributes its subcommands through a ``register(subparsers)`` function in a module that
imports nothing heavy at import time, so ``mnemo --help`` is instant and ``mnemo serve`` on the ONNX path
never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from mnemo import __version__
from mnemo.bundle import BundleError

# Modules with a ``register(subparsers)`` function, in the order their commands are listed.
COMMAND_MODULES = ("mnemo.cli_models", "mnemo.training.cli", "mnemo.service.cli", "mnemo.benchmarks.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnemo",
        description="Mnemo: anomaly scoring for visual inspection lines with memory-augmented autoencoders.",
        epilog="Run `mnemo COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mnemo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError, OSError, BundleError) as exc:
        # User errors (bad config field, unknown model, missing folder, a file in the way, a corrupt
        # bundle) get one clear line, not a traceback.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"mnemo {args.command}: error: {message}", file=sys.stderr)
        return 2
