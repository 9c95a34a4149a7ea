"""The public API: what the top-level package and the subpackages export, lazily."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import palsctl
from palsctl.registry import builtin, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_import_palsctl_stays_light():
    code = ("import sys, palsctl\n"
            "heavy = ['numpy', 'pydantic', 'cvxpy', 'control', 'matplotlib', 'palsctl.loop',\n"
            "         'palsctl.plants', 'palsctl.experiment', 'palsctl.controllers']\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == ""


def test_every_top_level_name_resolves():
    for name in palsctl.__all__:
        assert getattr(palsctl, name) is not None, name
    assert set(palsctl.__all__) <= set(dir(palsctl))
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        palsctl.NoSuchThing  # noqa: B018 - the attribute access is the test


def test_every_builtin_controller_is_exported_under_its_class_name():
    names = builtin("controller")
    assert {"static", "pi", "mpc", "search"} <= set(names)
    for name in names:
        cls = resolve(name)
        assert getattr(palsctl, cls.__name__) is cls
        assert cls.__name__ in palsctl.__all__


def test_readme_names_come_from_the_top_level():
    from palsctl.experiment import load_experiment, run_experiment
    from palsctl.loop import run_loop
    from palsctl.plants.sim import SimPlant

    assert palsctl.SimPlant is SimPlant and palsctl.run_loop is run_loop
    assert palsctl.load_experiment is load_experiment
    assert palsctl.run_experiment is run_experiment
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "from palsctl import (" in block and "from palsctl." not in block
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)   # the example runs as written (1200 s simulated)
    assert len(ns["record"].steps) == 1200
    assert palsctl.summarize(ns["record"])["tokens_per_joule"] > 0


@pytest.mark.parametrize("package", ["palsctl.adapters", "palsctl.analysis", "palsctl.cluster",
                                     "palsctl.controllers", "palsctl.experiment",
                                     "palsctl.models", "palsctl.plants",
                                     "palsctl.plants.sim", "palsctl.testing",
                                     "palsctl.workloads"])
def test_subpackages_export_their_main_names(package):
    mod = importlib.import_module(package)
    assert mod.__all__, package
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{package}.{name}"
