"""`palsctl profile` and `palsctl fit` end to end on the default experiment's simulated plant."""
import csv
import json

import pytest

from palsctl.cli import main
from palsctl.models import PowerPerfModel


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_profile_fit_plot(tmp_path, capsys):
    out = tmp_path / "profile.csv"
    args = ["profile", "--caps", "100:400:100", "--batches", "1,8,64", "--sample", "6",
            "--warmup-s", "15", "--window-s", "15", "--csv", str(out)]
    assert main(args + ["-q"]) == 0
    rows = _rows(out)
    assert len(rows) == 6
    assert {r["model"] for r in rows} == {"mixtral-8x7b"} and rows[0]["num_gpus"] == "4"
    assert "profiled 6 points" in capsys.readouterr().out
    # rerun: nothing left to measure, the file is unchanged (resumed)
    before = out.read_text()
    assert main(args) == 0
    assert out.read_text() == before
    model_path = tmp_path / "model.json"
    png = tmp_path / "model.png"
    assert main(["fit", str(out), "--model-file", str(model_path), "--folds", "3",
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "CV MAPE" in text and "throughput_tok_s" in text
    m = PowerPerfModel.load(model_path)
    assert m.kind == "parametric" and m.num_gpus == 4 and m.n_points == 6
    assert json.loads(model_path.read_text())["plant"]["gpu"] == "a100-sxm4-80gb"
    assert png.stat().st_size > 10_000
    # the old spelling still works and says it is deprecated
    assert main(["fit", str(out), "--out", str(tmp_path / "g.json"), "--kind", "forest",
                 "--folds", "0"]) == 0
    assert PowerPerfModel.load(tmp_path / "g.json").kind == "forest"
    assert "--out is deprecated; use --model-file" in capsys.readouterr().err


def test_profile_refine_adds_frontier_points_and_resumes(tmp_path):
    out = tmp_path / "p.csv"
    args = ["profile", "--sample", "8", "--refine", "3", "--warmup-s", "15", "--window-s", "15",
            "--prompt-tokens", "512", "--output-tokens", "256", "--out", str(out), "-q"]
    assert main(args) == 0
    rows = _rows(out)
    assert len(rows) == 11 and len({(r["power_cap_w"], r["max_batch"]) for r in rows}) == 11
    before = out.read_text()
    assert main(args) == 0  # resumed: same points chosen, nothing measured again
    assert out.read_text() == before


@pytest.mark.parametrize("argv,needle", [
    (["profile", "--caps", "50:100:10", "-q"], "--caps"),
    (["profile", "--caps", "abc", "-q"], "--caps"),
    (["profile", "--batches", "1,999", "-q"], "--batches"),
    (["profile", "--sample", "0", "-q"], "--sample"),
    (["profile", "--window-s", "0", "-q"], "--window-s"),
    (["profile", "--refine", "-1", "-q"], "--refine"),
    (["profile", "missing.toml", "-q"], "missing.toml"),
    (["fit", "missing.csv"], "missing.csv"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_fit_rejects_a_file_that_is_not_a_profile(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["fit", str(bad), "--model-file", str(tmp_path / "m.json")]) == 2
    assert "power_cap_w" in capsys.readouterr().err
