"""Options shared by the sub-commands: one name, one meaning everywhere.

=====================  ======================================================================
option                 meaning in every command that has it
=====================  ======================================================================
``--out DIR``          a results *folder* the command writes into
``--plot FILE``        one PNG *file* (a folder of plots is ``--out``)
``--json PATH``        a JSON file (``-``: stdout)
``--csv PATH``         a CSV file
``--model NAME``       an LLM preset of the simulator (``palsctl.plants.sim``) — a fitted
                       power-performance model file is ``--model-file PATH``
``--gpu NAME``         a GPU preset of the simulator
``--num-gpus N``       how many GPUs (a count) — GPU *indices* are ``--gpus 0,1,...``
``--controller NAME``  one registered controller; ``--controllers A,B,...`` a list, run
                       exactly as given (nothing added to it)
``--seed N``           the seed of every random source
``--data DIR``         the data folder (``palsctl data``)
``--duration-s S``     how long to run, seconds
``--quiet``            no progress output
``--metrics-port N``   serve the loop's state for Prometheus on this port (long-running
                       commands; ``--metrics-bind HOST``, loopback by default)
=====================  ======================================================================

`duration_override` checks a ``--duration-s`` the way the schemas check ``duration_s``;
`not_the_input` refuses an output path that is the file the command reads.
`deprecated_alias` keeps an old spelling working: it sets the new option's destination and
prints one warning line naming the new spelling. `add_metrics_arguments` and `start_metrics`
give a long-running command the Prometheus exporter (`palsctl.adapters.exporter`).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

__all__ = ["deprecated_alias", "duration_override", "not_the_input", "SHARED_OPTIONS",
           "add_metrics_arguments", "start_metrics"]

#: The longest run a ``duration_s`` may ask for, s (as the experiment schema).
MAX_DURATION_S = 1e7

#: Option string → (what it takes, in words): the meaning every command must give it.
SHARED_OPTIONS: dict[str, str] = {
    "--out": "folder",
    "--plot": "file",
    "--json": "json-file",
    "--csv": "csv-file",
    "--data": "data-folder",
    "--model": "llm-preset",
    "--model-file": "model-file",
    "--gpu": "gpu-preset",
    "--num-gpus": "gpu-count",
    "--gpus": "gpu-indices",
    "--controller": "controller-name",
    "--controllers": "controller-list",
    "--seed": "seed",
    "--duration-s": "seconds",
    "--quiet": "flag",
    "--metrics-port": "port",
    "--metrics-bind": "host",
}


def duration_override(value: float, dt_s: float) -> float:
    """Check a ``--duration-s`` override as the schemas check ``duration_s``.

    Parameters
    ----------
    value : float
        The option's value, s.
    dt_s : float
        The configured control period, s.

    Returns
    -------
    float
        ``value``.

    Raises
    ------
    ConfigError
        Not a finite number in ``[dt_s, 1e7]`` (one line naming ``--duration-s``).
    """
    from palsctl.errors import ConfigError

    if not (math.isfinite(value) and value > 0):
        raise ConfigError("must be a positive, finite number of seconds", key="--duration-s",
                          value=value)
    if value < dt_s:
        raise ConfigError(f"must be at least dt_s ({dt_s:g} s)", key="--duration-s", value=value)
    if value > MAX_DURATION_S:
        raise ConfigError(f"must be <= {MAX_DURATION_S:g} s", key="--duration-s", value=value)
    return float(value)


def not_the_input(key: str, dest: str | None, source: str | None, what: str) -> None:
    """Refuse an output file that is the input file (it would be overwritten).

    Parameters
    ----------
    key : str
        The output option (``"--json"``).
    dest : str or None
        Its value (None or ``"-"``: nothing written to a file).
    source : str or None
        The input file (None: none, as for the embedded default experiment).
    what : str
        The input in words (``"experiment file"``).

    Raises
    ------
    ConfigError
        ``dest`` and ``source`` are the same file (one line naming ``key``).
    """
    from pathlib import Path

    from palsctl.errors import ConfigError

    if dest in (None, "-") or source is None or not Path(source).is_file():
        return
    if Path(dest).resolve() == Path(source).resolve():
        raise ConfigError(f"would overwrite the {what} it reads; choose another file", key=key,
                          value=dest)


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kw: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, *, dest: str,
                     takes_value: bool = True, metavar: str | None = None,
                     type: Any = None) -> None:   # ``type``: argparse's name
    """Accept ``old`` as a deprecated spelling of ``new`` (same destination ``dest``; ``type``
    converts the value as the new option does)."""
    kw: dict[str, Any] = {"nargs": None if takes_value else 0, "default": argparse.SUPPRESS,
                          "help": f"deprecated spelling of {new}"}
    if takes_value and metavar:
        kw["metavar"] = metavar
    if takes_value and type is not None:
        kw["type"] = type
    parser.add_argument(old, action=_DeprecatedAlias, dest=dest, new=new, **kw)


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` / ``--metrics-bind``: the Prometheus exporter of a long-running loop."""
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve the loop's state for Prometheus on this port (0: a free one, "
                             "logged); see docs/monitoring.md (default: off)")
    parser.add_argument("--metrics-bind", default="127.0.0.1", metavar="HOST",
                        help="address the metrics port listens on (default 127.0.0.1, loopback "
                             "only; 0.0.0.0 for a Prometheus on another host)")


def start_metrics(args: argparse.Namespace, *, model_name: str | None, gpus: Any,
                  log: Any = None) -> Any:
    """A serving `palsctl.adapters.exporter.LoopExporter` when ``--metrics-port`` was given
    (None otherwise): feed it each step record (``on_step``) and ``close()`` it at the end.
    ``gpus``: the GPU indices (the ``gpu`` label). Raises `ConfigError` when the port cannot be
    bound."""
    if getattr(args, "metrics_port", None) is None:
        return None
    from palsctl.adapters.exporter import LoopExporter

    exporter = LoopExporter(model_name=model_name or "unknown", gpus=list(gpus))
    try:
        port = exporter.serve(args.metrics_port, args.metrics_bind)
    except Exception:
        exporter.close()
        raise
    if log is not None:
        log.info("Prometheus metrics on http://%s:%d/metrics", args.metrics_bind, port)
    return exporter
