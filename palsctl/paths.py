"""Where palsctl finds the public data sets (traces, measurements) it reads but never copies.

The data folder is the first of:

1. a folder given explicitly (a command's ``--data DIR``; ``data_dir(explicit)``);
2. the ``PALSCTL_DATA`` environment variable;
3. ``shared/data`` beside a source checkout (``<checkout>/../shared/data``), when it exists;
4. the user cache folder, where ``palsctl data fetch`` puts the data sets it downloads
   (``~/.cache/palsctl/data`` on Linux; `platformdirs` elsewhere), when it exists.

1 and 2 win even when the folder does not exist, so a wrong setting shows as "not found" instead
of being silently replaced. Inside the data folder each data set has its own sub-folder
(``azure-llm-2023/``, ``vessim-grid/``, ...; see `palsctl.datasets`), and configs name files
relative to it (``"azure-llm-2023/AzureLLMInferenceTrace_conv.csv"``).
"""
from __future__ import annotations

import os
from pathlib import Path

from palsctl.errors import ConfigError

__all__ = ["ENV_VAR", "cache_data_dir", "checkout_data_dir", "data_dir", "data_dir_origin",
           "data_file", "data_relative", "fetch_hint"]

ENV_VAR = "PALSCTL_DATA"


def cache_data_dir() -> Path:
    """The user cache folder for downloaded data sets (it may not exist yet)."""
    import platformdirs

    return platformdirs.user_cache_path("palsctl") / "data"


def checkout_data_dir() -> Path:
    """``shared/data`` beside the source checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def data_dir_origin(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """The data folder (see the module doc for the order) and where it came from, in words:
    ``"--data"``, ``"PALSCTL_DATA"``, ``"beside the checkout"``, ``"user cache"``, or
    ``"none"`` (then the folder is None)."""
    if explicit is not None and str(explicit):
        return Path(explicit).expanduser(), "--data"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser(), ENV_VAR
    beside = checkout_data_dir()
    if beside.is_dir():
        return beside, "beside the checkout"
    cache = cache_data_dir()
    if cache.is_dir():
        return cache, "user cache"
    return None, "none"


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The data folder, or None when none is set and none exists."""
    return data_dir_origin(explicit)[0]


def data_relative(path: str | Path) -> str:
    """``path`` relative to the data folder when it lies there (so a config naming it works on
    another machine), else ``path`` unchanged."""
    base = data_dir()
    if base is not None:
        try:
            return Path(path).resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return str(path)


def fetch_hint(relative: str | None = None) -> str:
    """How to get the data set holding ``relative`` (one phrase, for error and skip messages).

    >>> fetch_hint("vessim-grid/solar_example.csv")
    'get it with `palsctl data fetch vessim-grid` (or set PALSCTL_DATA to a folder holding it)'
    """
    from palsctl.datasets import DATASETS

    head = Path(relative).parts[0] if relative else ""
    name = head if head in DATASETS else "all"
    return (f"get it with `palsctl data fetch {name}` "
            f"(or set {ENV_VAR} to a folder holding it)")


def data_file(relative: str, explicit: str | Path | None = None) -> Path:
    """Path of ``relative`` inside the data folder; a `ConfigError` naming the file and saying
    how to get it when it is missing."""
    base = data_dir(explicit)
    if base is None:
        raise ConfigError(f"data file {relative!r} not found: no data folder; "
                          + fetch_hint(relative))
    path = base / relative
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}; " + fetch_hint(relative))
    return path
