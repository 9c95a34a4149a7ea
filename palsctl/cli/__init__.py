"""The ``palsctl`` command line.

Each sub-command lives in its own module ``palsctl.cli.<name>`` exposing
``HELP: str``, ``add_arguments(parser)`` and ``main(args) -> int``. Modules import their heavy
dependencies inside ``main`` so that ``palsctl --help`` stays fast.
A `PalsctlError` (a user's mistake) prints one line per error and exits with
status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from palsctl.errors import PalsctlError, PalsctlWarning

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "run": "palsctl.cli.run",
    "compare": "palsctl.cli.compare",
    "calibrate": "palsctl.cli.calibrate",
    "profile": "palsctl.cli.profile",
    "fit": "palsctl.cli.fit",
    "analyze": "palsctl.cli.analyze",
    "emulate": "palsctl.cli.emulate",
    "gateway": "palsctl.cli.gateway",
    "control": "palsctl.cli.control",
    "restore": "palsctl.cli.restore",
    "data": "palsctl.cli.data",
    "fleet": "palsctl.cli.fleet",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the ``palsctl`` parser with every sub-command's options."""
    from palsctl import __version__

    parser = argparse.ArgumentParser(
        prog="palsctl",
        description="Power-aware LLM serving: joint GPU power-cap and batch control.")
    parser.add_argument("--version", action="version", version=f"palsctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # command not built (yet)
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def _one_line_warnings(command: str) -> None:
    """Print a `PalsctlWarning` as ``palsctl COMMAND: warning: ...`` (once per message);
    other warnings keep Python's format."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PalsctlWarning):
            print(f"palsctl {command}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("default", PalsctlWarning)


def main(argv: list[str] | None = None) -> int:
    """Run ``palsctl`` (``argv``: the arguments; None: ``sys.argv[1:]``); return the exit status
    (2 for a user's mistake, printed on one line per error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            _one_line_warnings(args.command)
            return int(args._main(args) or 0)
    except PalsctlError as exc:  # one line per error (a ConfigError may carry several)
        for line in str(exc).splitlines() or [""]:
            print(f"palsctl {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"palsctl {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
