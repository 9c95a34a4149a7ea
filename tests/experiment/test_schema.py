"""The experiment and serving schemas: every error at once, "did you mean", the cross-field
checks, typed schedule specs built once, and the resolved config's round trip."""
import dataclasses
import tomllib

import pydantic
import pytest

from palsctl.cli import main
from palsctl.errors import ConfigError
from palsctl.experiment import (
    ExperimentConfig,
    build_schedule,
    build_workload,
    experiment_from_dict,
    load_experiment,
    run_experiment,
)
from palsctl.experiment.schema import (
    GridSchedule,
    RampSchedule,
    StepsSchedule,
    control_from_dict,
    serving_from_dict,
)
from palsctl.types import SETPOINT_FIELDS, Setpoint

BASE = """
name = "schema"
duration_s = 12.0
seed = 5
[plant]
model = "llama-3.1-8b"
gpu = "h100-sxm"
max_batch_launch = 64
[workload]
kind = "poisson"
rate_req_s = 3.0
prompt_tokens_mean = 200
output_tokens_mean = 100
[setpoint]
throughput_tok_s = "demand"
tpot_slo_s = 0.1
power_budget_w = { steps = [[0, 700], [6, 450]] }
[controller]
name = "pi"
margin = 0.2
[guard]
max_cap_change_w = 40
"""


def write(tmp_path, text, name="exp.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(text, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_experiment(write(tmp_path, text))
    return {e.key: e for e in info.value.errors}, info.value


# ---- every error at once ---------------------------------------------------------------------
def test_every_error_is_reported_at_once_one_line_each(tmp_path, capsys):
    text = (BASE.replace("seed = 5", "seed = -1")
            .replace('max_batch_launch = 64', 'max_batch_launch = 64\nnosie = false')
            .replace("rate_req_s = 3.0", "rate_req_s = 'fast'")
            .replace("tpot_slo_s = 0.1", "tpot_slo_s = -0.1")
            .replace("margin = 0.2", "margin = 0.2\nkp = true")
            .replace("max_cap_change_w = 40", "max_cap_change_w = 0"))
    errors, exc = errors_of(text, tmp_path)
    assert set(errors) == {"seed", "plant.nosie", "workload.rate_req_s", "setpoint.tpot_slo_s",
                           "controller.kp", "guard.max_cap_change_w"}
    assert errors["seed"].value == -1 and "must be >= 0" in errors["seed"].message
    assert errors["workload.rate_req_s"].value == "fast"
    assert len(str(exc).splitlines()) == 6
    assert all(line.startswith(str(tmp_path / "exp.toml")) for line in str(exc).splitlines())

    path = write(tmp_path, text)
    assert main(["run", str(path), "-q", "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 6 and "Traceback" not in "".join(lines)
    assert all(line.startswith("palsctl run: error: ") for line in lines)
    assert any("plant.nosie" in line and "did you mean 'noise'?" in line for line in lines)
    assert not (tmp_path / "o").exists()


def test_controller_cross_field_check_is_collected_with_the_others(tmp_path):
    # static's own __post_init__ check (max_batch >= 1) runs after pydantic's field checks
    text = BASE.replace('name = "pi"\nmargin = 0.2', 'name = "static"\nmax_batch = 0') \
        .replace("max_batch_launch = 64", "max_batch_launch = 0")
    errors, _ = errors_of(text, tmp_path)
    assert set(errors) == {"controller.max_batch", "plant.max_batch_launch"}
    assert errors["controller.max_batch"].file == str(tmp_path / "exp.toml")


@pytest.mark.parametrize("old,new,key,suggestion", [
    ("seed = 5", "sed = 5", "sed", "seed"),
    ('gpu = "h100-sxm"', 'gpu = "h100-sxm"\nnum_gpu = 2', "plant.num_gpu", "num_gpus"),
    ('gpu = "h100-sxm"', 'gpu = "h100-smx"', "plant.gpu", "h100-sxm"),
    ("rate_req_s = 3.0", "rate_req = 3.0", "workload.rate_req", "rate_req_s"),
    ("tpot_slo_s = 0.1", "tpot_slo = 0.1", "setpoint.tpot_slo", "tpot_slo_s"),
    ('name = "pi"', 'name = "pii"', "controller.name", "pi"),
    ("margin = 0.2", "margn = 0.2", "controller.margn", "margin"),
    ("max_cap_change_w = 40", "max_cap_change = 40", "guard.max_cap_change", "max_cap_change_w"),
])
def test_did_you_mean(tmp_path, old, new, key, suggestion):
    errors, _ = errors_of(BASE.replace(old, new), tmp_path)
    assert key in errors, errors
    assert f"did you mean {suggestion!r}?" in errors[key].message
    assert "known:" in errors[key].message


def test_exact_toml_types(tmp_path):
    errors, _ = errors_of(BASE.replace("max_batch_launch = 64", "max_batch_launch = '64'")
                          .replace("duration_s = 12.0", "duration_s = true")
                          .replace("tpot_slo_s = 0.1", "tpot_slo_s = nan"), tmp_path)
    assert errors["plant.max_batch_launch"].message == "must be an integer"
    assert errors["duration_s"].message == "must be a finite number"
    assert errors["setpoint.tpot_slo_s"].message == "must be a finite number"


# ---- cross-field checks ----------------------------------------------------------------------
@pytest.mark.parametrize("budget,lowest", [
    ("150.0", 150), ("{ steps = [[0, 700], [6, 190]] }", 190),
    ("{ ramp = [[0, 700], [6, 100]] }", 100), ("{ constant = 50 }", 50),
])
def test_budget_below_the_plants_floor(tmp_path, budget, lowest):
    # one H100: the minimum cap is 200 W
    text = BASE.replace("power_budget_w = { steps = [[0, 700], [6, 450]] }",
                        f"power_budget_w = {budget}")
    errors, _ = errors_of(text, tmp_path)
    e = errors["setpoint.power_budget_w"]
    assert f"down to {lowest:g} W" in e.message and "floor of 200 W" in e.message


def test_budget_floor_counts_every_gpu(tmp_path):
    text = BASE.replace("max_batch_launch = 64", "max_batch_launch = 64\nnum_gpus = 4")
    errors, _ = errors_of(text, tmp_path)   # 450 W < 4 x 200 W
    assert "floor of 800 W" in errors["setpoint.power_budget_w"].message
    ok = text.replace("[[0, 700], [6, 450]]", "[[0, 2800], [6, 800]]")
    assert load_experiment(write(tmp_path, ok, "ok.toml")).plant["num_gpus"] == 4


def test_grid_budget_floor_uses_min_w(tmp_path):
    grid = tmp_path / "grid.csv"
    grid.write_text("t,signal\n0,1\n60,3\n120,2\n")
    text = BASE.replace("power_budget_w = { steps = [[0, 700], [6, 450]] }",
                        'power_budget_w = { grid = "grid.csv", min_w = 120, max_w = 700 }')
    errors, _ = errors_of(text, tmp_path)
    assert "down to 120 W" in errors["setpoint.power_budget_w"].message
    cfg = load_experiment(write(tmp_path, text.replace("min_w = 120", "min_w = 300"), "ok.toml"))
    spec = cfg.setpoint["power_budget_w"]
    assert isinstance(spec, GridSchedule) and spec.grid == str(grid.absolute())


def test_model_that_does_not_fit_the_gpus(tmp_path):
    text = BASE.replace('model = "llama-3.1-8b"', 'model = "llama-3.1-70b"') \
        .replace("[6, 450]", "[6, 400]")
    errors, _ = errors_of(text, tmp_path)
    e = errors["plant.num_gpus"]
    assert "does not fit on 1 × h100-sxm" in e.message and "num_gpus >= 3" in e.message
    assert e.value == 1
    cfg = load_experiment(write(tmp_path, text.replace(
        "max_batch_launch = 64", "max_batch_launch = 64\nnum_gpus = 4")
        .replace("[[0, 700], [6, 400]]", "[[0, 2800], [6, 800]]"), "ok.toml"))
    assert cfg.plant["model"] == "llama-3.1-70b"


def test_the_simulated_plants_limits_are_found_at_load_under_dotted_keys(tmp_path):
    # they were the plant constructor's errors, keyed 'max_batch_launch', 'power_cap_w' and
    # 'max_batch' without their table (and, in a fleet, without their pool)
    text = BASE.replace("max_batch_launch = 64",
                        "max_batch_launch = 10000\npower_cap_w = 900.0\nmax_batch = 20000")
    errors, exc = errors_of(text, tmp_path)
    assert set(errors) == {"plant.max_batch_launch", "plant.power_cap_w", "plant.max_batch"}
    assert "max_num_batched_tokens (8192)" in errors["plant.max_batch_launch"].message
    assert errors["plant.power_cap_w"].message == \
        "outside the power limits of h100-sxm [200, 700] W"
    assert errors["plant.max_batch"].value == 20000
    assert all(line.startswith(str(tmp_path)) for line in str(exc).splitlines())


# ---- typed schedule specs, built once --------------------------------------------------------
def test_schedule_specs_are_frozen_objects_built_once(tmp_path):
    text = BASE.replace('tpot_slo_s = 0.1', 'tpot_slo_s = { ramp = [[0, 0.2], [10, 0.1]] }')
    cfg = load_experiment(write(tmp_path, text))
    budget, tpot = cfg.setpoint["power_budget_w"], cfg.setpoint["tpot_slo_s"]
    assert isinstance(budget, StepsSchedule) and budget.steps == ((0.0, 700.0), (6.0, 450.0))
    assert isinstance(tpot, RampSchedule)
    with pytest.raises(pydantic.ValidationError):
        budget.steps = ((0.0, 1.0),)
    built = budget.schedule          # the schedule the validator built
    workload = build_workload(cfg)
    for _ in range(2):               # every build reuses it
        sched = build_schedule(cfg, workload)
        assert sched.fields["power_budget_w"] is built
    assert sched(5.9).power_budget_w == 700.0 and sched(6.0).power_budget_w == 450.0
    assert sched(5.0).tpot_slo_s == pytest.approx(0.15)


def test_a_bad_grid_column_is_found_at_load(tmp_path):
    (tmp_path / "grid.csv").write_text("t,signal\n0,1\n60,3\n")
    text = BASE.replace("power_budget_w = { steps = [[0, 700], [6, 450]] }",
                        'power_budget_w = { grid = "grid.csv", min_w = 300, max_w = 700, '
                        'column = "sydney" }')
    errors, _ = errors_of(text, tmp_path)
    assert "no column 'sydney'" in errors["setpoint.power_budget_w.grid"].message


def test_setpoint_keys_are_the_setpoint_fields(tmp_path):
    assert SETPOINT_FIELDS == tuple(f.name for f in dataclasses.fields(Setpoint))
    errors, _ = errors_of(BASE.replace("[setpoint]", "[setpoint]\nbudget = 3"), tmp_path)
    assert errors["setpoint.budget"].message.endswith("known: " + ", ".join(
        sorted(SETPOINT_FIELDS)))


# ---- the resolved config round-trips ----------------------------------------------------------
def round_trip(cfg: ExperimentConfig, tmp_path) -> ExperimentConfig:
    path = tmp_path / "resolved" / "config.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(cfg.to_toml())
    again = load_experiment(path)
    assert again == cfg
    assert experiment_from_dict(tomllib.loads(cfg.to_toml())) == cfg
    assert again.to_dict() == cfg.to_dict()
    return again


def test_default_experiment_round_trips():
    cfg = load_experiment()
    d = cfg.to_dict()
    # defaults filled in: the controller's whole Config, the guard, the plant's noise
    assert d["plant"]["noise"] is True
    assert d["guard"] == {"enabled": True, "enforce_measured_power": True,
                          "power_tolerance_frac": 0.03, "power_persist_steps": 2}
    from palsctl.controllers.search import SearchConfig
    assert d["controller"]["name"] == "search"
    assert d["controller"]["margin"] == SearchConfig().margin
    assert "power_cap_w" not in d["plant"]          # None is left out (TOML has no null)
    assert experiment_from_dict(tomllib.loads(cfg.to_toml())) == cfg


def test_round_trip_with_overrides_and_other_tables(tmp_path):
    text = BASE.replace('kind = "poisson"', 'kind = "mmpp"\nrates_req_s = [1, 4]\n'
                        'mean_dwell_s = [5.0, 2.0]') \
        .replace("[setpoint]", "[setpoint]\npower_target_w = { ramp = [[0, 500], [8, 300]] }")
    cfg = load_experiment(write(tmp_path, text))
    assert cfg.workload["rates_req_s"] == (1.0, 4.0)
    round_trip(cfg, tmp_path)
    overridden = cfg.with_overrides(seed=9, duration_s=7.0).with_controller("cap-to-budget")
    again = round_trip(overridden, tmp_path)
    assert again.seed == 9 and again.controller_name == "cap-to-budget"
    assert again.controller_params == {"max_batch": 256, "budget_margin": 0.0}  # its defaults
    assert cfg.with_controller("pi") is cfg


def test_round_trip_with_trace_and_grid_from_the_data_folder(tmp_path, shared_data):
    text = BASE.replace('kind = "poisson"\nrate_req_s = 3.0\nprompt_tokens_mean = 200\n'
                        'output_tokens_mean = 100',
                        'kind = "trace"\npath = "azure-llm-2023/AzureLLMInferenceTrace_code.csv"'
                        '\nload = 0.5\nwindow_s = 300.0') \
        .replace("power_budget_w = { steps = [[0, 700], [6, 450]] }",
                 'power_budget_w = { grid = "vessim-grid/solar_example.csv", '
                 'column = "Sydney", min_w = 300, max_w = 700, speedup = 600 }')
    cfg = load_experiment(write(tmp_path, text))
    round_trip(cfg, tmp_path)


def test_reloaded_config_reproduces_the_run_bit_for_bit(tmp_path):
    cfg = load_experiment(write(tmp_path, BASE))
    path = tmp_path / "config.toml"
    path.write_text(cfg.with_overrides(seed=2).to_toml())
    a = run_experiment(cfg, seed=2)
    b = run_experiment(load_experiment(path))
    assert len(a.steps) == len(b.steps) == 12
    assert [(s.measurement, s.setpoint, s.applied) for s in a.steps] == \
        [(s.measurement, s.setpoint, s.applied) for s in b.steps]


# ---- the [serving] table of `palsctl control` ---------------------------------------------------
CONTROL = """
name = "ctl"
[serving]
metrics_url = "http://127.0.0.1:9/metrics"
batch = "scheduler"
batch_file = "batch"
[setpoint]
power_budget_w = 300.0
[controller]
name = "static"
"""


def test_serving_table(tmp_path):
    cfg, serving = control_from_dict(tomllib.loads(CONTROL), file="c.toml", base_dir=tmp_path)
    assert cfg.duration_s is None and cfg.controller_name == "static"
    assert serving["batch_file"] == str(tmp_path / "batch") and serving["power"] == "nvml"
    assert serving["max_batch_launch"] == 256 and serving["gpus"] is None


def test_serving_errors_at_once_with_the_experiments(tmp_path):
    bad = CONTROL.replace('batch_file = "batch"', 'batch_fle = "batch"\ngpus = [0, -1]\n'
                          'metrics_timeout_s = 100') \
        .replace('name = "static"', 'name = "static"\nmax_batch = 0')
    with pytest.raises(ConfigError) as info:
        control_from_dict(tomllib.loads(bad), file="c.toml")
    errors = {e.key: e for e in info.value.errors}
    assert set(errors) == {"serving.batch_fle", "serving.gpus[1]", "serving.metrics_timeout_s",
                           "serving.batch_file", "controller.max_batch"}
    assert "did you mean 'batch_file'?" in errors["serving.batch_fle"].message
    assert errors["serving.batch_file"].message == \
        "missing required key (for batch = 'scheduler')"
    with pytest.raises(ConfigError, match="must be an http"):
        serving_from_dict({"metrics_url": "ftp://x"}, file=None)
