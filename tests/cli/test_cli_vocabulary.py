"""One vocabulary across commands: every option of every sub-command has help, and an option
name shared by several commands means the same thing in each (`palsctl.cli.options`)."""
import argparse

import pytest

from palsctl.cli import build_parser, main
from palsctl.cli.options import SHARED_OPTIONS

# how each shared meaning shows in argparse: the metavar it is written with, and whether it
# takes a value
EXPECTED = {
    "folder": {"DIR"},
    "file": {"PNG"},
    "json-file": {"PATH"},
    "csv-file": {"PATH"},
    "llm-preset": {"NAME"},
    "model-file": {"PATH"},
    "gpu-preset": {"NAME"},
    "gpu-count": {"N"},
    "gpu-indices": {"LIST"},
    "controller-name": {"NAME"},
    "controller-list": {"A,B,..."},
    "seed": {"N"},
    "seconds": {"S"},
    "data-folder": {"DIR"},
    "flag": {None},
    "port": {"PORT"},
    "host": {"HOST"},
}


def _subparsers(parser: argparse.ArgumentParser, path=("palsctl",)):
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _subparsers(sp, (*path, name))


def _options():
    for path, p in _subparsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                              argparse._SubParsersAction)):
                continue
            yield " ".join(path), a


def _deprecated(a) -> bool:
    return bool(a.help) and a.help.startswith("deprecated spelling of ")


def test_every_option_and_argument_has_help():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in _options()
               if not a.help or a.help == argparse.SUPPRESS or not a.help.strip()]
    assert not missing, missing


def test_shared_option_names_have_one_meaning():
    seen: dict[str, list[str]] = {}
    wrong = []
    for cmd, a in _options():
        for opt in a.option_strings:
            meaning = SHARED_OPTIONS.get(opt)
            if meaning is None or _deprecated(a):
                continue
            seen.setdefault(opt, []).append(cmd)
            takes = a.nargs != 0
            metavar = a.metavar if takes else None
            if metavar not in EXPECTED[meaning]:
                wrong.append(f"{cmd} {opt}: {metavar!r} ({a.help!r}) but {opt} means {meaning}")
    assert not wrong, "\n".join(wrong)
    # the vocabulary is really shared: most of its options appear in several commands
    assert sum(len(v) > 1 for v in seen.values()) >= 6, seen


def test_deprecated_spellings_name_their_replacement_and_it_exists():
    for cmd, a in _options():
        if _deprecated(a):
            new = a.help.removeprefix("deprecated spelling of ").split()[0]
            opts = {o for c, b in _options() if c == cmd for o in b.option_strings}
            assert new in opts, f"{cmd}: {a.option_strings} points at missing {new}"


@pytest.mark.parametrize("argv", [["emulate", "--help"], ["analyze", "--help"]])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage: palsctl" in capsys.readouterr().out


@pytest.mark.parametrize("old,new", [
    (["emulate", "--gpus", "2"], ["emulate", "--num-gpus", "2"]),
    (["fit", "p.csv", "--out", "m.json"], ["fit", "p.csv", "--model-file", "m.json"]),
    (["profile", "--out", "p.csv"], ["profile", "--csv", "p.csv"]),
    (["analyze", "--plot", "d"], ["analyze", "--out", "d"]),
    (["analyze", "--model", "m.json"], ["analyze", "--model-file", "m.json"]),
    (["run", "--versus-static"], ["run", "--versus", "static"]),
])
def test_old_spellings_parse_as_the_new_ones(old, new, capsys):
    p = build_parser()
    a, b = vars(p.parse_args(old)), vars(p.parse_args(new))
    a.pop("_main", None), b.pop("_main", None)
    assert a == b
