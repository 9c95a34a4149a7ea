import re
from pathlib import Path

import pytest

from palsctl.datasets import DATASETS
from palsctl.paths import ENV_VAR, data_dir
from palsctl.registry import register, unregister

_NAMED = re.compile(r"""["']((?:%s)/[^"']+)["']""" % "|".join(map(re.escape, DATASETS)))


def skip_unless_data(*relative: str, config: Path | None = None) -> Path | None:
    """Skip the calling test, with one line saying how to get them, unless the data folder
    holds every file named: ``relative`` paths in the data folder, and the data files a config
    file (``config``) names."""
    if config is not None:
        relative += tuple(_NAMED.findall(Path(config).read_text()))
    d = data_dir()
    missing = [r for r in relative if d is None or not (d / r).is_file()]
    if missing:
        names = sorted({Path(r).parts[0] for r in missing})
        what = "all" if len(names) == len(DATASETS) else " ".join(names)
        pytest.skip(f"needs public data ({', '.join(names)}): get it with `palsctl data fetch "
                    f"{what}` (or set {ENV_VAR} to a folder holding it)")
    return d


@pytest.fixture(scope="session")
def shared_data():
    """The data folder holding every public data set (see `palsctl data list`)."""
    return skip_unless_data(*[p for ds in DATASETS.values() for p in ds.data_paths])


@pytest.fixture
def require_data():
    """``require_data(*relative, config=None)``: skip unless those data files are present."""
    return skip_unless_data


@pytest.fixture
def registered():
    """``registered(name, target, kind="controller")``: `palsctl.registry.register` for this
    test only; every name it registered is unregistered when the test ends."""
    added: list[tuple[str, str]] = []

    def _register(name, target, *, kind="controller"):
        register(name, target, kind=kind)
        added.append((name, kind))

    yield _register
    for name, kind in reversed(added):
        unregister(name, kind=kind)
