import json
import tomllib

import pytest

from palsctl.cli import main
from palsctl.errors import ConfigError
from palsctl.experiment import (
    DEFAULT_EXPERIMENT_TOML,
    build_schedule,
    build_workload,
    experiment_from_dict,
    full_power_capacity_req_s,
    load_experiment,
    run_experiment,
)
from palsctl.metrics import SUMMARY_KEYS, summarize

SHORT = """
name = "short"
duration_s = 30.0
dt_s = 1.0
seed = 3
[plant]
model = "llama-3.1-8b"
gpu = "h100-sxm"
num_gpus = 1
max_batch_launch = 64
[workload]
kind = "poisson"
rate_req_s = 4.0
prompt_tokens_mean = 300
output_tokens_mean = 120
output_tokens_sigma = 0.5
[setpoint]
throughput_tok_s = "demand"
power_budget_w = { steps = [[0, 700], [10, 400]] }
[controller]
name = "cap-to-budget"
max_batch = 32
"""


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_experiment_matches_the_issue():
    cfg = load_experiment()
    assert cfg.plant["model"] == "mixtral-8x7b" and cfg.plant["gpu"] == "a100-sxm4-80gb"
    assert cfg.plant["num_gpus"] == 4 and cfg.duration_s == 1200.0 and cfg.dt_s == 1.0
    from palsctl.registry import available
    assert cfg.controller_name in available() and cfg.controller_name == "search"
    sched = build_schedule(cfg, build_workload(cfg))
    assert [sched(t).power_budget_w for t in (0, 479, 480, 839, 840, 1199)] == \
        [1400, 1400, 900, 900, 1400, 1400]
    # ~70 % of the replica's full-power capacity (saturated steady state)
    w = build_workload(cfg)
    cap = full_power_capacity_req_s(cfg, w.mean_prompt_tokens, w.mean_output_tokens)
    assert w.rate_req_s == pytest.approx(0.7 * cap)
    assert sched(0).throughput_tok_s == pytest.approx(w.demand_tok_s)


def test_default_run_shortened(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--duration-s", "90", "--out", str(out), "--json", str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["duration_s"] == pytest.approx(90.0)
    assert summary["controller"] == load_experiment().controller_name
    assert summary["energy_j"] > 0 and summary["generated_tokens"] > 0
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    # the default experiment also runs static and cap-to-budget on the same workload and seed
    assert list(summary["baselines"]) == ["static", "cap-to-budget"]
    assert summary["static"] == summary["baselines"]["static"]
    for name, slug in (("static", "static"), ("cap-to-budget", "cap_to_budget")):
        base = summary["baselines"][name]
        assert base["tokens_per_joule"] > 0
        assert summary[f"gain_vs_{slug}"] == pytest.approx(
            summary["tokens_per_joule"] / base["tokens_per_joule"])
        assert summary[f"qos_violation_rate_vs_{slug}"] == pytest.approx(
            summary["qos_violation_rate"] - base["qos_violation_rate"])
        assert (out / f"steps-{name}.csv").read_text().count("\n") == 91
    # the headline says it in words, as printed
    printed = capsys.readouterr().out
    qos = summary["qos_violation_rate"] * 100
    for name in ("static", "cap-to-budget"):
        b = summary["baselines"][name]["qos_violation_rate"] * 100
        words = "same" if round(qos, 1) == round(b, 1) else "worse" if qos > b else "better"
        line = f"QoS violations {qos:.1f} % vs {b:.1f} % ({words})"
        assert line in summary["headline"][name] and line in printed
    assert f"{summary['controller']} vs cap-to-budget (facility power capping" in printed
    lines = (out / "steps.csv").read_text().splitlines()
    assert len(lines) == 91 and lines[0].startswith("t_s,window_s,power_w")
    assert (out / "timeline.png").stat().st_size > 10_000
    assert "gain vs static" not in printed and "points)" not in printed


def test_headline_in_words():
    from palsctl.cli.run import add_gain_vs, headline, headline_text

    s = {"controller": "search", "tokens_per_joule": 1.252, "qos_violation_rate": 0.085,
         "slo_attainment": 0.951, "time_over_budget_s": 1.0}
    add_gain_vs(s, {"tokens_per_joule": 1.088, "qos_violation_rate": 0.040,
                    "slo_attainment": 0.9512, "time_over_budget_s": 555.0}, "static")
    add_gain_vs(s, {"tokens_per_joule": 1.3, "qos_violation_rate": 0.0851,
                    "slo_attainment": 0.97, "time_over_budget_s": 0.0}, "cap-to-budget")
    s["headline"] = headline(s)
    assert s["headline"]["static"] == [
        "tokens per joule 1.252 vs 1.088 (+15.1 %, better)",
        "QoS violations 8.5 % vs 4.0 % (worse)",
        "SLO attainment 95.1 % vs 95.1 % (same)",
        "time over budget 1 s vs 555 s (better)"]
    assert s["headline"]["cap-to-budget"] == [
        "tokens per joule 1.252 vs 1.300 (-3.7 %, worse)",
        "QoS violations 8.5 % vs 8.5 % (same)",
        "SLO attainment 95.1 % vs 97.0 % (worse)",
        "time over budget 1 s vs 0 s (worse)"]
    text = headline_text(s).splitlines()
    assert text[0] == ("search vs static (default power limit and batch, no power management: "
                       "ignores the budget):")
    assert text[2] == "  QoS violations 8.5 % vs 4.0 % (worse)"
    assert s["gain_vs_cap_to_budget"] == pytest.approx(1.252 / 1.3)


def test_versus_baselines_only_by_default_for_the_default_experiment(tmp_path, capsys):
    cfgp = write(tmp_path, SHORT)
    assert main(["run", str(cfgp), "-q", "--no-plot", "--out", str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "gain_vs_static" not in s and "baselines" not in s and "headline" not in s
    assert main(["run", str(cfgp), "-q", "--no-plot", "--versus", "static,zeus",
                 "--out", str(tmp_path / "b")]) == 0
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["controller"] == "cap-to-budget" and list(s["baselines"]) == ["static", "zeus"]
    assert s["gain_vs_static"] > 0 and s["gain_vs_zeus"] > 0
    # the controller itself is no baseline; the earlier spelling still works
    assert main(["run", str(cfgp), "-q", "--no-plot", "--versus-static", "--controller",
                 "static", "--out", str(tmp_path / "c")]) == 0
    assert "baselines" not in json.loads((tmp_path / "c" / "summary.json").read_text())
    assert main(["run", "-q", "--no-plot", "--duration-s", "5", "--no-versus",
                 "--out", str(tmp_path / "d")]) == 0
    assert "static" not in json.loads((tmp_path / "d" / "summary.json").read_text())
    assert main(["run", str(cfgp), "-q", "--versus", "nope", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--versus" in err and "nope" in err


def _rows_without_wall_clock(path):
    """steps.csv without its wall-clock column (the controller's step latency)."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    k = rows[0].index("step_latency_s")
    return [r[:k] + r[k + 1:] for r in rows]


def test_results_folder_reproduces_bit_for_bit(tmp_path, capsys):
    """A run's folder holds the resolved config and its provenance; `--from` reruns it (same
    controller, its parameters, baselines, seed) and every recorded value except the
    wall-clock step latency is identical."""
    cfgp = write(tmp_path, SHORT.replace("seed = 3", "seed = 5"))
    a = tmp_path / "a"
    assert main(["run", str(cfgp), "-q", "--controller", "pi", "--seed", "7", "--duration-s",
                 "25", "--versus", "static", "--out", str(a)]) == 0
    cfg = tomllib.loads((a / "config.toml").read_text())
    assert (cfg["seed"], cfg["duration_s"], cfg["controller"]["name"]) == (7, 25.0, "pi")
    assert cfg["controller"]["margin"] == 0.1  # the complete Config, defaults included (pi)
    assert cfg["workload"]["kind"] == "poisson" and cfg["workload"]["rate_req_s"] == 4.0
    prov = json.loads((a / "provenance.json").read_text())
    import palsctl
    assert prov["palsctl_version"] == palsctl.__version__ and prov["seed"] == 7
    assert prov["controller"]["name"] == "pi" and "ki_cap_budget_per_s" in \
        prov["controller"]["config"]
    assert [b["name"] for b in prov["baselines"]] == ["static"]
    assert prov["plant"]["model"] == "llama-3.1-8b" and prov["dependencies"]["numpy"]
    assert prov["python"] and "git" in prov

    assert main(["run", "--from", str(a / "config.toml"), "-q"]) == 0
    b = tmp_path / "a-rerun"  # the default output folder of --from
    for f in ("steps.csv", "steps-static.csv"):
        assert _rows_without_wall_clock(a / f) == _rows_without_wall_clock(b / f)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):   # wall-clock step times (in the steps file too, so in its checksum)
        del s["step_latency_p50_s"], s["step_latency_p99_s"], s["steps_file"]["sha256"]
    assert sa == sb and sa["controller"] == "pi" and list(sa["baselines"]) == ["static"]
    assert (a / "config.toml").read_text().split("\n", 2)[2] == \
        (b / "config.toml").read_text().split("\n", 2)[2]

    # a folder works too; never over the run it reproduces; a recorded version that differs
    prov["palsctl_version"] = "0.0.1"
    (a / "provenance.json").write_text(json.dumps(prov))
    capsys.readouterr()
    assert main(["run", "--from", str(a), "-q", "--no-plot", "--out", str(tmp_path / "c")]) == 0
    assert "recorded with palsctl 0.0.1" in capsys.readouterr().err
    assert main(["run", "--from", str(a), "-q", "--out", str(a)]) == 2
    assert "would overwrite the run it reproduces" in capsys.readouterr().err
    assert main(["run", "--from", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--from" in err and len(err.strip().splitlines()) == 1


def test_a_trace_shorter_than_the_run_warns_at_load(tmp_path, capsys):
    import warnings
    from pathlib import Path

    from palsctl.errors import PalsctlWarning

    trace = Path(__file__).resolve().parents[2] / "examples" / "data" / "moe_throughput_targets.csv"
    text = SHORT.replace("""kind = "poisson"
rate_req_s = 4.0
prompt_tokens_mean = 300
output_tokens_mean = 120
output_tokens_sigma = 0.5""", f"""kind = "trace"
path = "{trace}"
window_s = 100.0""")
    cfg = load_experiment(write(tmp_path, text))
    with pytest.warns(PalsctlWarning, match=r"ends at 100 s but the run lasts 130 s"):
        build_workload(cfg.with_overrides(duration_s=130.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_workload(cfg)  # 30 s of 100: no warning
        build_workload(cfg.with_overrides(duration_s=100.5))  # ends in the run's last 1 %
        build_workload(load_experiment(write(tmp_path, text.replace(
            "window_s = 100.0", "window_s = 10.0\nrepeat = true"))))
    # the CLI prints it on one line, once
    path = write(tmp_path, text.replace("duration_s = 30.0", "duration_s = 120.0"), "long.toml")
    assert main(["run", str(path), "-q", "--no-plot", "--versus", "static",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"palsctl run: warning: {path}: the trace workload ends at 100 s but the run "
                   "lasts 120 s, so nothing arrives after that; set workload.repeat = true, a "
                   "longer workload.window_s or a lower load, or a shorter duration_s"]


def test_timeline_overlays_baselines_and_shows_latency_against_the_slos(tmp_path):
    from palsctl.plotting import latency_violations, timeline_figure

    cfg = load_experiment(write(tmp_path, SHORT.replace(
        'throughput_tok_s = "demand"', 'throughput_tok_s = "demand"\ntpot_slo_s = 0.0081\n'
        'ttft_slo_s = 0.03')))
    rec = run_experiment(cfg)
    base = run_experiment(cfg, controller="static")
    bad = latency_violations(rec)
    assert len(bad) == len(rec.steps) and any(bad) and not all(bad)
    fig = timeline_figure(rec, baselines={"static": base})
    labels = [a.get_ylabel() for a in fig.axes]
    assert labels[:4] == ["power, all GPUs (W)", "generated tokens/s", "p90 TPOT (s)",
                          "power cap per GPU (W)"]
    assert {"p90 TTFT (s)", "sequences"} <= set(labels)
    legends = {t.get_text() for a in fig.axes if a.get_legend()
               for t in a.get_legend().get_texts()}
    assert {"static power", "static (30 s mean)", "budget", "target", "window over an SLO",
            "TPOT SLO (left axis)", "TTFT SLO (right axis)", "cap per GPU (left axis)",
            "batch limit (right axis)"} <= legends
    assert len(fig.axes[2].patches) >= 1  # one shaded span per run of violating windows
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_same_workload_for_every_controller_and_seed_override(tmp_path):
    cfg = load_experiment(write(tmp_path, SHORT))
    a = run_experiment(cfg)
    b = run_experiment(cfg, controller="static")
    c = run_experiment(cfg, seed=4)
    assert a.controller == "cap-to-budget" and b.controller == "static"
    dem = [s.measurement.demand_tok_s for s in a.steps]
    assert dem == [s.measurement.demand_tok_s for s in b.steps]
    assert dem != [s.measurement.demand_tok_s for s in c.steps]
    assert [s.applied.max_batch for s in a.steps] == [32] * 30  # configured parameter
    assert [s.applied.power_cap_w for s in a.steps][12:] == [400.0] * 18
    assert summarize(a)["settling_times_s"] is not None


def test_static_runs_unguarded_and_cap_to_budget_guarded(tmp_path):
    # the guard is enabled in the experiment, but `static` (guarded = False) ignores the budget:
    # cap at the default limit, over the 400 W budget; cap-to-budget is guarded and fits it
    cfg = load_experiment(write(tmp_path, SHORT))
    st = run_experiment(cfg, controller="static")
    assert st.meta["guard_enabled"] is False
    assert all(s.applied.power_cap_w == 700.0 for s in st.steps)
    assert all(not s.guard_note for s in st.steps)
    assert summarize(st)["time_over_budget_s"] > 0
    cb = run_experiment(cfg)
    assert cb.meta["guard_enabled"] is True
    assert all(s.applied.power_cap_w <= s.setpoint.power_budget_w for s in cb.steps)


def test_trace_and_grid_config(tmp_path, shared_data):
    text = SHORT.replace("""kind = "poisson"
rate_req_s = 4.0
prompt_tokens_mean = 300
output_tokens_mean = 120
output_tokens_sigma = 0.5""", """kind = "trace"
path = "azure-llm-2023/AzureLLMInferenceTrace_code.csv"
start_s = 60.0
window_s = 600.0
load = 0.5""").replace("power_budget_w = { steps = [[0, 700], [10, 400]] }",
                       'power_budget_w = { grid = "vessim-grid/solar_example.csv", '
                       'column = "Sydney", min_w = 300, max_w = 700, speedup = 600 }')
    cfg = load_experiment(write(tmp_path, text))
    rec = run_experiment(cfg)
    budgets = {s.setpoint.power_budget_w for s in rec.steps}
    assert len(budgets) > 3 and min(budgets) >= 300 and max(budgets) <= 700
    assert rec.meta["workload"]["kind"] == "trace"


BAD = [
    ("name = 'x'\nduration_s = 10\nbogus = 1\n[controller]\nname='static'\n", "bogus", None),
    ("name = 'x'\nduration_s = 'long'\n[controller]\nname='static'\n", "duration_s", "'long'"),
    ("name = 'x'\nduration_s = -5\n[controller]\nname='static'\n", "duration_s", "-5"),
    ("name = 'x'\nduration_s = 10\n[plant]\nnum_gpus = 2.5\n[controller]\nname='static'\n",
     "plant.num_gpus", "2.5"),
    ("name = 'x'\nduration_s = 10\n[plant]\nmodel = 'gpt-9'\n[controller]\nname='static'\n",
     "plant.model", "gpt-9"),
    ("name = 'x'\nduration_s = 10\n[workload]\nkind = 'trace'\npath = 'no/such.csv'\n"
     "[controller]\nname='static'\n", "workload.path", "no/such.csv"),
    ("name = 'x'\nduration_s = 10\n[controller]\nname='nope'\n", "controller.name", "nope"),
    ("name = 'x'\nduration_s = 10\n[controller]\nname='static'\nmax_btch = 3\n",
     "controller.max_btch", None),
    ("name = 'x'\nduration_s = 10\n[controller]\nname='static'\nmax_batch = 0\n",
     "controller.max_batch", None),
    ("name = 'x'\nduration_s = 10\n[setpoint]\npower_budget_w = { steps = [[5, 1]] }\n"
     "[controller]\nname='static'\n", "setpoint.power_budget_w", None),
    ("name = 'x'\nduration_s = 10\n[setpoint]\npower_budget = 3\n[controller]\nname='static'\n",
     "setpoint.power_budget", None),
    ("name = 'x'\nduration_s = 10\n[guard]\nmax_cap_change_w = -3\n[controller]\nname='static'\n",
     "guard.max_cap_change_w", None),
    ("name = 'x'\nduration_s = 10\n", "controller", None),
    ("name = 'x'\nduration_s = = 10\n", "TOML", None),
]


# The default plant (Mixtral-8x7B on one A100-80GB) does not fit in memory: a case without a
# [plant] table gets one that fits, so that each case has exactly one error.
FITS = "\n[plant]\nnum_gpus = 4\n"


@pytest.mark.parametrize("text,key,value", BAD)
def test_config_errors_exit_2_with_one_line(tmp_path, capsys, text, key, value):
    path = write(tmp_path, text if "[plant]" in text else text + FITS)
    rc = main(["run", str(path), "-q", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and key in err
    if value is not None:
        assert value in err
    assert not (tmp_path / "o").exists()


def test_missing_config_file_and_bad_override(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert "none.toml" in err and "not found" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--controller", "nope", "--duration-s", "5", "-q",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "--no-versus", "--no-plot"],
                                     ["compare", "--controllers", "static"]])
@pytest.mark.parametrize("value, why", [
    ("inf", "must be a positive, finite number of seconds"),
    ("nan", "must be a positive, finite number of seconds"),
    ("-5", "must be a positive, finite number of seconds"),
    ("0.5", "must be at least dt_s (1 s)"),
    ("1e12", "must be <= 1e+07 s"),
])
def test_a_bad_duration_override_is_one_line_naming_the_option(tmp_path, capsys, command,
                                                                value, why):
    # run named 'duration_s' for inf and "at least dt_s" for nan; compare took 0.5 < dt_s
    path = tmp_path / "exp.toml"
    path.write_text(SHORT)
    assert main([command[0], str(path), *command[1:], "-q", "--out", str(tmp_path / "o"),
                 "--duration-s", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"palsctl {command[0]}: error: key '--duration-s': {why} (got {float(value)})"


def test_show_default_round_trips(capsys):
    assert main(["run", "--show-default"]) == 0
    text = capsys.readouterr().out
    assert text == DEFAULT_EXPERIMENT_TOML
    cfg = experiment_from_dict(tomllib.loads(text))
    assert cfg.name == "default"
    with pytest.raises(ConfigError, match="duration_s"):
        experiment_from_dict({"controller": {"name": "static"}})


def test_mmpp_ramp_and_unguarded_config(tmp_path):
    text = """
name = "mmpp"
duration_s = 20.0
[plant]
model = "llama-3.1-8b"
gpu = "h100-sxm"
[workload]
kind = "mmpp"
rates_req_s = [1.0, 9.0]
mean_dwell_s = [30.0, 10.0]
load = 0.5
output_tokens_mean = 100
[setpoint]
power_budget_w = { ramp = [[0, 700], [20, 300]] }
power_target_w = 400
[controller]
name = "static"
[guard]
enabled = false
"""
    cfg = load_experiment(write(tmp_path, text))
    w = build_workload(cfg)
    cap = full_power_capacity_req_s(cfg, w.mean_prompt_tokens, w.mean_output_tokens)
    assert w.rate_req_s == pytest.approx(0.5 * cap)
    assert w.rates_req_s[1] / w.rates_req_s[0] == pytest.approx(9.0)
    rec = run_experiment(cfg)
    assert rec.steps[9].setpoint.power_budget_w == pytest.approx(500.0)
    assert all(s.applied.power_cap_w == 700.0 for s in rec.steps)  # unguarded static
    s = summarize(rec)
    assert s["power_tracking_mae_w"] > 0 and s["time_over_budget_s"] > 0
    bad = text.replace("load = 0.5", "load = 0.5\nrate_req_s = 3.0")
    with pytest.raises(ConfigError, match="rate_req_s or load"):
        load_experiment(write(tmp_path, bad, "bad.toml"))


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["run", "--duration-s", "3", "-q", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--out" in err


@pytest.mark.parametrize("where", ["json", "out"])
def test_a_run_never_overwrites_the_experiment_file_it_runs(tmp_path, capsys, where):
    # --json at the config, or a config named config.toml in its own --out folder: the run
    # replaced the user's file (comments and all) with its summary or the resolved config
    path = tmp_path / ("exp.toml" if where == "json" else "config.toml")
    path.write_text(SHORT + "# mine\n")
    extra = ["--json", str(path)] if where == "json" else []
    assert main(["run", str(path), "-q", "--no-plot", "--no-versus", "--duration-s", "2",
                 "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"key '--{where}'" in err[0] and "would overwrite" in err[0]
    assert path.read_text() == SHORT + "# mine\n"
