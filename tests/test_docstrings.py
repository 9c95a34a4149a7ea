"""Docstrings of the public API follow numpydoc (as python-control's do), with units.

Every class and function a package in `PACKAGES` exports (its ``__all__``) is checked by
numpydoc's own validator: it has a docstring with a summary, its
parameters are all documented (with a type and a description, none that does not exist), a
function that returns something has a Returns section, and the sections are known and in order.
A parameter whose name carries a unit (``_w``, ``_s``, ``_j``, ``_tok_s``, ...) says the unit in
its description.
"""
from __future__ import annotations

import importlib
import inspect
import re

import pytest

# numpydoc is in the test extra; a venv made before it was added skips until `make install`
numpydoc_validate = pytest.importorskip("numpydoc.validate")
Validator = numpydoc_validate.Validator
get_doc_object = numpydoc_validate.get_doc_object
validate = numpydoc_validate.validate

PACKAGES = ["palsctl.analysis", "palsctl.cluster", "palsctl.controllers", "palsctl.experiment",
            "palsctl.models", "palsctl.plants.sim", "palsctl.testing", "palsctl.workloads"]

#: numpydoc's checks that every exported docstring passes (see numpydoc.validate.ERROR_MSGS):
#: a docstring (GL08) with a summary (SS01); known sections (GL06) in order (GL07); every
#: parameter documented (PR01), none unknown (PR02), each with a type (PR04) and a description
#: (PR07); a Returns section where something is returned (RT01), described (RT03); Yields (YD01).
CHECKS = frozenset({"GL06", "GL07", "GL08", "SS01", "PR01", "PR02", "PR04", "PR07", "RT01",
                    "RT03", "YD01"})

#: unit suffix of a parameter name -> what its description must mention (first match wins)
UNITS = [
    ("_tok_s", r"tok(en)?s?/s|tokens? per second"),
    ("_req_s", r"req(uest)?s?/s|requests? per second"),
    ("_tok", r"tokens?\b"),
    ("_w", r"\bW\b|watts?\b"),
    ("_j", r"\bJ\b|joules?\b"),
    ("_mhz", r"\bMHz\b"),
    ("_b", r"\bB\b|bytes?\b"),
    ("_s", r"\bs\b|seconds?\b"),
]


def _exports() -> list[tuple[str, str]]:
    seen: set[int] = set()
    out = []
    for package in PACKAGES:
        mod = importlib.import_module(package)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            out.append((package, name))
    return out


def _path(package: str, name: str) -> str:
    obj = getattr(importlib.import_module(package), name)
    return f"{obj.__module__}.{obj.__qualname__}"


@pytest.mark.parametrize(("package", "name"), _exports())
def test_exported_docstring_is_numpydoc(package, name):
    path = _path(package, name)
    errors = [f"{code}: {msg}" for code, msg in validate(path)["errors"] if code in CHECKS]
    assert not errors, f"{package}.{name} ({path}):\n  " + "\n  ".join(errors)


@pytest.mark.parametrize(("package", "name"), _exports())
def test_exported_parameters_say_their_units(package, name):
    doc = Validator(get_doc_object(getattr(importlib.import_module(package), name)))
    missing = []
    for param, (_type, desc) in doc.doc_parameters.items():
        text = " ".join(desc)
        for suffix, unit in UNITS:
            if param.endswith(suffix):
                if not re.search(unit, text):
                    missing.append(f"{param} (expected {unit!r})")
                break
    assert not missing, f"{package}.{name}: no unit in the description of " + ", ".join(missing)

