"""The fleet file's validation (one clear error naming file, key and value) and the CLI."""
from __future__ import annotations

import json

import pytest

from palsctl.cli import main
from palsctl.cluster.schema import parse_fleet_text
from palsctl.errors import ConfigError

GOOD = """
name = "cli"
duration_s = 12.0
[site]
power_budget_w = { steps = [[0.0, 1400.0], [6.0, 900.0]] }
period_s = 3.0
policy = "proportional"
[[pool]]
name = "llama"
replicas = 2
plant = { model = "llama-3.1-8b", gpu = "h100-sxm", num_gpus = 1, max_batch_launch = 64 }
workload = { kind = "poisson", load = 0.5, prompt_tokens_mean = 256, output_tokens_mean = 128 }
setpoint = { throughput_frac = 0.5, tpot_slo_s = 0.1 }
controller = { name = "cap-to-budget" }
"""


@pytest.mark.parametrize("old, new, key", [
    ('policy = "proportional"', 'policy = "fair"', "site.policy"),
    ('model = "llama-3.1-8b"', 'model = "llama-9"', "pool[0].plant.model"),
    ('kind = "poisson"', 'kind = "poison"', "pool[0].workload.kind"),
    ("throughput_frac = 0.5", "throughput_frac = 1.5", "pool[0].setpoint.throughput_frac"),
    ("throughput_frac = 0.5", "power_budget_w = 100.0", "pool[0].setpoint.power_budget_w"),
    ('name = "cap-to-budget"', 'name = "nope"', "controller.name"),
    ("replicas = 2", "replicas = 0", "pool[0].replicas"),
    ("period_s = 3.0", "period_s = 3.0\nlease_s = 1.0", "site.lease_s"),
    ("[[pool]]", "colour = 1\n[[pool]]", "site.colour"),
    ('{ steps = [[0.0, 1400.0], [6.0, 900.0]] }', '{ steps = [[1.0, 1400.0]] }',
     "site.power_budget_w.steps"),
])
def test_bad_fleet_names_the_key(old, new, key):
    with pytest.raises(ConfigError) as e:
        parse_fleet_text(GOOD.replace(old, new, 1), file="f.toml")
    assert f"key '{key}'" in str(e.value) or f"key 'pool[0].{key}'" in str(e.value)
    assert str(e.value).startswith("f.toml: ")


@pytest.mark.parametrize("name", ["..", ".", "a\\\\b"])
def test_a_pool_name_that_is_no_plain_folder_name_is_refused(name):
    # pool ".." with one replica wrote its steps.csv beside summary.json, out of replicas/
    with pytest.raises(ConfigError, match=r"key 'pool\[0\]\.name': must be a plain, unique name"):
        parse_fleet_text(GOOD.replace('name = "llama"', f'name = "{name}"'), file="f.toml")


def test_a_pool_named_like_another_pools_replica_is_refused():
    # pool "llama" has replicas llama-0 and llama-1: a pool "llama-1" of one replica had the
    # same name, so its results folder and requests collided (was "duplicate request_id 1")
    text = GOOD + GOOD[GOOD.index("[[pool]]"):].replace('name = "llama"', 'name = "llama-1"') \
        .replace("replicas = 2", "replicas = 1")
    with pytest.raises(ConfigError) as e:
        parse_fleet_text(text, file="f.toml")
    assert str(e.value) == ("f.toml: key 'pool[1].name': its replica 'llama-1' has the name of a "
                            "replica of pool 'llama'; rename one of the pools (got 'llama-1')")


def test_throughput_frac_resolves_against_full_power_capacity():
    from palsctl.cluster.runtime import build_replica_specs
    from palsctl.plants.sim import steady_state

    cfg = parse_fleet_text(GOOD)
    specs, wls = build_replica_specs(cfg)
    ss = steady_state("llama-3.1-8b", "h100-sxm", 1, 64, prompt_tokens=wls[0].mean_prompt_tokens,
                      output_tokens=wls[0].mean_output_tokens)
    assert specs[0].target_tok_s == pytest.approx(0.5 * ss.throughput_tok_s)
    assert specs[0].experiment.setpoint["throughput_tok_s"] == specs[0].target_tok_s
    # the pool's stream: load x replicas x one replica's capacity
    assert wls[0].rate_req_s == pytest.approx(
        0.5 * 2 * ss.throughput_tok_s / wls[0].mean_output_tokens)


def test_cli_run_and_compare(tmp_path, capsys):
    f = tmp_path / "fleet.toml"
    f.write_text(GOOD)
    out = tmp_path / "out"
    assert main(["fleet", "run", str(f), "--out", str(out), "--json", str(tmp_path / "s.json"),
                 "-q"]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    for k in ("tokens_per_joule", "qos_violation_rate", "time_over_budget_s",
              "energy_over_budget_j", "energy_j", "generated_tokens", "allocation_ms_p99",
              "pools"):
        assert k in s
    assert s["pools"]["llama"]["replicas"] == 2
    for p in ("replicas/llama-0/steps.csv", "replicas/llama-1/steps.csv", "site.csv",
              "site_timeline.png", "summary.json"):
        assert (out / p).is_file(), p
    assert main(["fleet", "compare", str(f), "--policies", "equal,marginal", "--out",
                 str(tmp_path / "cmp"), "--json", "-", "-q"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert set(both) == {"equal", "marginal"}
    assert both["equal"]["policy"] == "equal" and both["marginal"]["policy"] == "marginal"


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "fleet.toml"
    f.write_text(GOOD.replace("replicas = 2", "replicas = -1"))
    assert main(["fleet", "run", str(f), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pool[0].replicas" in err and "-1" in err
    f.write_text(GOOD)
    assert main(["fleet", "compare", str(f), "--policies", "equal,fair", "-q"]) == 2
    assert "--policies" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "compare"])
def test_json_at_the_fleet_file_is_refused_and_the_file_kept(tmp_path, capsys, command):
    f = tmp_path / "fleet.toml"
    f.write_text(GOOD)
    assert main(["fleet", command, str(f), "-q", "--json", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"palsctl fleet: error: key '--json': would overwrite the fleet file it reads; "
                   f"choose another file (got {str(f)!r})")
    assert f.read_text() == GOOD


FLEET_EXAMPLES = sorted((__import__("pathlib").Path(__file__).resolve().parents[2]
                         / "examples").glob("fleet_*.toml"))


@pytest.mark.parametrize("path", FLEET_EXAMPLES, ids=[p.stem for p in FLEET_EXAMPLES])
def test_fleet_examples_load(path, require_data):
    from palsctl.cluster import load_fleet

    require_data(config=path)
    cfg = load_fleet(path)
    assert cfg.num_replicas >= 3 and cfg.duration_s >= 1200.0
