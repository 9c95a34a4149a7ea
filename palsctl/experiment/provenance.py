"""What a results folder needs to be reproduced: the resolved experiment as TOML, and the run's
provenance (controller parameters, plant, seed, palsctl and dependency versions, git revision,
checksums of the data files it read).

``palsctl run --from results/<name>/config.toml`` reruns the experiment from these files; the
simulated plant and workloads are seeded, so every recorded value except the wall-clock
controller step latency comes out the same.
"""
from __future__ import annotations

import dataclasses
import functools
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from palsctl.experiment.schema import ExperimentConfig
from palsctl.paths import data_relative

__all__ = ["CONFIG_FILE", "PROVENANCE_FILE", "config_to_dict", "config_to_toml",
           "dependency_versions", "git_revision", "provenance"]

CONFIG_FILE = "config.toml"
PROVENANCE_FILE = "provenance.json"


def config_to_dict(cfg: ExperimentConfig, *, controller: str | None = None) -> dict[str, Any]:
    """The resolved experiment as a TOML-ready dict (`ExperimentConfig.to_dict`: every default
    filled in, the controller's complete Config, file paths relative to the data folder when
    they lie there); ``controller`` overrides the configured name, with that controller's
    defaults, as `palsctl.experiment.build_controller` does."""
    return (cfg if controller is None else cfg.with_controller(controller)).to_dict()


def config_to_toml(cfg: ExperimentConfig, *, controller: str | None = None,
                   header: str = "") -> str:
    """`config_to_dict` as TOML text, after ``header`` (comment lines)."""
    return (cfg if controller is None else cfg.with_controller(controller)).to_toml(header)


@functools.lru_cache(maxsize=1)
def git_revision() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the source checkout palsctl runs from, or None
    when it is not a git checkout (an installed package) or git is missing."""
    here = Path(__file__).resolve().parents[1]  # the palsctl package folder

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if not (top / "palsctl" / "__init__.py").resolve() == here / "__init__.py":
            return None
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def dependency_versions() -> dict[str, str | None]:
    """Installed version of each of palsctl's declared dependencies (None: not installed)."""
    from importlib import metadata

    try:
        reqs = metadata.requires("palsctl") or []
    except metadata.PackageNotFoundError:
        return {}
    out: dict[str, str | None] = {}
    for req in reqs:
        if "extra ==" in req:
            continue
        m = re.match(r"[A-Za-z0-9_.\-]+", req)
        if m is None:
            continue
        name = m.group(0)
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(cfg: ExperimentConfig, *, controller: str | None = None,
               baselines: tuple[str, ...] = (), argv: list[str] | None = None) -> dict[str, Any]:
    """What produced a run: the command, the experiment's name, seed and plant, the controller's
    and each baseline's name and complete Config, the sha256 of every data file read, and the
    versions of palsctl, Python and the dependencies, and the git revision when palsctl runs
    from a checkout."""
    from palsctl import __version__
    from palsctl.datasets import sha256_file
    from palsctl.experiment.build import build_controller

    def ctl(name: str | None) -> dict[str, Any]:
        c = build_controller(cfg, name)
        return {"name": name or cfg.controller_name, "config": dataclasses.asdict(c.config)}

    return {
        "command": list(sys.argv if argv is None else argv),
        "experiment": cfg.name, "config_file": CONFIG_FILE, "source": cfg.source,
        "seed": cfg.seed, "duration_s": cfg.duration_s, "dt_s": cfg.dt_s,
        "plant": dict(cfg.plant),
        "controller": ctl(controller),
        "baselines": [ctl(b) for b in baselines],
        "data_files": {data_relative(p): sha256_file(Path(p)) for p in cfg.data_files()},
        "palsctl_version": __version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dependencies": dependency_versions(),
    }
