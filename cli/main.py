"""The ``lungvit`` command line: one sub-command per module, each with its own ``--help``.

Exit codes: 0 success; 1 some input could not be processed (each failure reported);
2 usage error (argparse); 3 a model or configuration problem stopped the command.
Everything a command writes is readable by its owner only (:mod:`lungvit.core.owner_only`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lungvit.cli import exit_codes
from lungvit.core import __version__
from lungvit.core.errors import LungViTError
from lungvit.core.owner_only import owner_only_files, tighten
from lungvit.core.io.phi import data_dir

# Each module defines ``register(subparsers)``, which adds its parser(s) and sets
# ``func`` to a callable taking the parsed namespace and returning an exit code.
# Modules must import cheaply: heavy work is imported when the command runs.
COMMAND_MODULES: tuple[str, ...] = (
    "lungvit.cli.inspect_cmd",
    "lungvit.cli.demo_data_cmd",
    "lungvit.cli.model_cmds",
    "lungvit.cli.predict_cmd",
    "lungvit.cli.explain_cmd",
    "lungvit.cli.train_cmd",
    "lungvit.cli.runs_cmd",
)



def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="lungvit",
        description="LungViT: read, classify and explain chest X-ray and retinal OCT scans; "
        "fine-tune the model on your own labelled folders.",
    )
    parser.add_argument("--version", action="version", version=f"lungvit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A command whose optional part is not installed simply does not appear.
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lungvit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return exit_codes.USAGE
    # What commands write (stores, run folders, checkpoints, job processes' files) is the
    # user's only; a data directory an older version left open is closed.
    tighten([data_dir()])
    try:
        with owner_only_files():
            return int(args.func(args))
    except LungViTError as exc:
        print(f"lungvit {args.command}: {exc}", file=sys.stderr)
        return exit_codes.ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
