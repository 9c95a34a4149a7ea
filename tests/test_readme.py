"""The README tells the truth: every command, config and Python block in it runs as shown, in
order, in one scratch folder (``.venv/bin/palsctl`` and ``.venv/bin/python`` there run this
interpreter's palsctl; ``examples`` is the checkout's). Commands and configs that need public
data skip, saying how to get it, when the data folder lacks it. Two kinds of lines are checked
without being run: ``make demo`` / ``make test`` (the set-up; a fresh-clone CI run does those)
and ``palsctl data fetch`` (it downloads from GitHub; tests reach loopback only, and
tests/test_datasets.py runs the same code against a loopback server)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from palsctl.datasets import DATASETS
from palsctl.experiment import DEFAULT_EXPERIMENT_TOML

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)


def _items() -> list[tuple[str, str]]:
    """(kind, text) in README order: ("sh", one command line), ("toml", a config block),
    ("python", a code block)."""
    out = []
    for lang, body in BLOCKS:
        if lang == "sh":
            out += [("sh", line) for line in body.splitlines() if line.strip()]
        elif lang in ("toml", "python"):
            out.append((lang, body))
        else:
            raise AssertionError(f"README block of unknown kind {lang!r}: {body[:60]!r}")
    return out


ITEMS = _items()


def _id(item: tuple[str, str]) -> str:
    kind, text = item
    first = text.splitlines()[0].split("  #")[0].strip()
    return f"{kind}: {first[:70]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch folder laid out like a checkout where `make install` ran."""
    d = tmp_path_factory.mktemp("readme")
    (d / ".venv" / "bin").mkdir(parents=True)
    for name, cmd in (("palsctl", f'"{sys.executable}" -m palsctl'),
                      ("python", f'"{sys.executable}"')):
        shim = d / ".venv" / "bin" / name
        shim.write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        shim.chmod(0o755)
    (d / "examples").symlink_to(ROOT / "examples")
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "MPLBACKEND": "Agg", "COLUMNS": "200"}


def _needs_data(words: list[str], work: Path, require_data) -> None:
    for w in words:
        p = work / w
        if w.endswith(".toml") and p.is_file():
            require_data(config=p)
    if words[1:2] == ["calibrate"]:
        require_data(*DATASETS["mlenergy-v3"].data_paths)


def _toml_name(text: str) -> str:
    m = re.match(r"#\s*([\w.-]+\.toml):", text)
    assert m, "a README config other than the default starts with '# <file>.toml: ...'"
    return m.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("item", ITEMS, ids=[_id(i) for i in ITEMS])
def test_readme_item_runs_as_shown(item, work, require_data):
    kind, text = item
    if kind == "toml":
        if text == DEFAULT_EXPERIMENT_TOML:
            return  # test_write_an_experiment_shows_the_default checks it; run via my.toml
        (work / _toml_name(text)).write_text(text)
        return
    if kind == "python":
        r = subprocess.run([str(work / ".venv/bin/python"), "-c", text], cwd=work, env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        _python_prints_what_palsctl_run_prints(r.stdout, work)
        return
    words = shlex.split(text, comments=True)
    assert words[0] in ("make", ".venv/bin/palsctl"), text
    if words[0] == "make":
        assert words[1:] in (["demo"], ["test"]), text
        return
    if words[1:3] == ["data", "fetch"]:
        from palsctl.cli import build_parser

        args = build_parser().parse_args(words[1:])
        assert set(args.names) <= {*DATASETS, "all"}
        return
    _needs_data(words, work, require_data)
    r = subprocess.run(["bash", "-c", text], cwd=work, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{text}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "warning:" not in r.stderr, r.stderr[-3000:]
    if words[1:] == ["run"]:  # the demo: the comparison in words
        summary = json.loads((work / "results/default/summary.json").read_text())
        q = summary["qos_violation_rate"] * 100
        for name in ("static", "cap-to-budget"):
            b = summary["baselines"][name]["qos_violation_rate"] * 100
            assert f"QoS violations {q:.1f} % vs {b:.1f} % (" in r.stdout
            assert f"{summary['controller']} vs {name} (" in r.stdout


def _python_prints_what_palsctl_run_prints(stdout: str, work: Path) -> None:
    path = work / "results/default/summary.json"
    if not path.is_file():
        return  # run on its own: the `palsctl run` line did not run before it
    s = json.loads(path.read_text())
    c = s["baselines"]["cap-to-budget"]
    assert stdout.splitlines() == [
        f"{s['controller']}: {s['tokens_per_joule']:.3f} tokens/J, "
        f"QoS violations {s['qos_violation_rate']:.1%}",
        f"cap-to-budget: {c['tokens_per_joule']:.3f} tokens/J, "
        f"QoS violations {c['qos_violation_rate']:.1%}"]


def test_write_an_experiment_shows_the_default():
    tomls = [body for lang, body in BLOCKS if lang == "toml"]
    assert tomls[0] == DEFAULT_EXPERIMENT_TOML
    assert "palsctl run --show-default > my.toml" in README


def test_set_up_needs_only_make_demo_and_make_test():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    makes = [text.split("#")[0].strip() for kind, text in ITEMS
             if kind == "sh" and text.startswith("make")]
    assert makes == ["make demo", "make test"] and "make demo" in setup


def test_controllers_named_are_the_registered_ones():
    # in a fresh interpreter: other tests register controllers of their own
    code = "from palsctl.registry import available; print(' '.join(available('controller')))"
    registered = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True, timeout=60).stdout.split()
    text = " ".join(README.split())
    sentence = text.split("`[controller]` names a registered controller", 1)[1]
    sentence = sentence.split("every other key goes to its Config", 1)[0]
    assert set(re.findall(r"`([a-z-]+)`", sentence)) == set(registered)


def test_data_section_names_every_data_set_and_its_license():
    data = README.split("## Data", 1)[1]
    for ds in DATASETS.values():
        row = next(line for line in data.splitlines() if line.startswith(f"| `{ds.name}` |"))
        assert ds.license in row and ds.commit in row and ds.repo in row
    assert "palsctl data fetch all" in data and "PALSCTL_DATA" in data
