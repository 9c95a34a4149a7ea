"""Where palsctl finds the public data sets (traces, measurements) it reads but never copies.

The data folder is looked up in this order: the ``PALSCTL_DATA`` environment variable, then
``shared/data`` beside the source checkout (``<checkout>/../shared/data``). A command that needs
a file takes an explicit path too (``--data PATH``)."""
from __future__ import annotations

import os
from pathlib import Path

from palsctl.errors import ConfigError


def data_dir() -> Path | None:
    """The shared data folder, or None when it cannot be found."""
    env = os.environ.get("PALSCTL_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def data_file(relative: str) -> Path:
    """Path of ``relative`` inside the data folder; `ConfigError` naming it when missing."""
    base = data_dir()
    if base is None:
        raise ConfigError(f"data folder not found (set PALSCTL_DATA or pass a path) for {relative!r}")
    path = base / relative
    if not path.exists():
        raise ConfigError(f"data file not found: {path}")
    return path
