"""A run's results are moved into place whole: never new steps beside an old summary."""
from __future__ import annotations

import json

import pytest

from palsctl.experiment.results import ResultsDir, csv_digest, steps_file_entry, write_summary


def _run(out, rows, extra=()):
    with ResultsDir(out) as rd:
        rd.file("steps.csv").write_text("t_s,x\n" + "".join(f"{k},{k}\n" for k in range(rows)))
        for name in extra:
            rd.file(name).write_text("x\n")
        summary = {"steps_file": steps_file_entry(rd.file("steps.csv"))}
        rd.file("summary.json").write_text(json.dumps(summary))
        return rd.commit()


def _consistent(out):
    s = json.loads((out / "summary.json").read_text())["steps_file"]
    return (s["rows"], s["sha256"]) == csv_digest(out / s["path"])


def test_a_fresh_folder_and_a_previous_run_are_replaced_whole(tmp_path):
    out = tmp_path / "results" / "x"
    written = _run(out, 5, extra=["steps-static.csv"])
    assert written == [out / "steps.csv", out / "steps-static.csv", out / "summary.json"]
    assert _consistent(out) and json.loads((out / "summary.json").read_text())["steps_file"][
        "rows"] == 5
    _run(out, 3)                                   # a new run over the previous one
    assert sorted(p.name for p in out.iterdir()) == ["steps.csv", "summary.json"]
    assert _consistent(out)
    assert [p.name for p in out.parent.iterdir()] == ["x"]       # no temporary left


def test_a_folder_with_other_files_keeps_them(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    _run(out, 4)
    assert (out / "notes.txt").read_text() == "my notes" and _consistent(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_failure_before_commit_leaves_the_previous_results(tmp_path):
    out = tmp_path / "x"
    _run(out, 2)
    before = (out / "summary.json").read_text()
    with pytest.raises(RuntimeError):
        with ResultsDir(out) as rd:
            rd.file("steps.csv").write_text("t_s\n1\n")
            raise RuntimeError("killed while plotting")
    assert (out / "summary.json").read_text() == before and _consistent(out)
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_write_summary_names_the_steps_file_relative_to_it(tmp_path):
    steps = tmp_path / "steps.csv"
    steps.write_text('t_s,note\n1,"a, b"\n2,"two\nlines"\n')
    s = write_summary(tmp_path / "summary.json", {"steps": 2}, steps)
    assert s["steps_file"]["path"] == "steps.csv" and s["steps_file"]["rows"] == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == s
