"""The Grafana dashboard in docs/grafana: a well-formed dashboard model whose palsctl queries
name series the exporter really serves, beside DCGM's and vLLM's."""
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from palsctl.adapters import vllm_metrics
from palsctl.adapters.exporter import LoopExporter
from palsctl.loop import StepRecord
from palsctl.types import Action, Measurement, Setpoint

PATH = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "palsctl-control.json"
PANEL_TYPES = {"timeseries", "row", "stat", "gauge", "table", "text"}
# the nine series of the exporter's brief
REQUIRED = {"palsctl_power_cap_watts", "palsctl_batch_limit", "palsctl_power_budget_watts",
            "palsctl_power_watts", "palsctl_throughput_tokens_per_second",
            "palsctl_tokens_per_joule", "palsctl_guard_interventions_total",
            "palsctl_controller_step_seconds", "palsctl_qos_violations_total"}
METRIC = re.compile(r"(?<![\w:$])([A-Za-z_][A-Za-z0-9_]*:?[A-Za-z0-9_:]*)\s*(?=[{\[])")


@pytest.fixture(scope="module")
def dash():
    return json.loads(PATH.read_text())


def _exprs(dash):
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _served_names() -> set[str]:
    ex = LoopExporter(model_name="m", gpus=[0])
    ex.observe(StepRecord(t_s=1.0, measurement=Measurement(t_s=1.0, window_s=1.0, power_w=300.0,
                                                           energy_j=300.0, throughput_tok_s=50.0),
                          setpoint=Setpoint(power_budget_w=400.0), requested=Action(),
                          applied=Action(power_cap_w=300.0, max_batch=8), step_latency_s=1e-4))
    return {s.name for f in text_string_to_metric_families(ex.text()) for s in f.samples}


def test_dashboard_model_is_well_formed(dash):
    for key, typ in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list),
                     ("templating", dict), ("time", dict), ("tags", list), ("version", int)):
        assert isinstance(dash[key], typ), key
    assert dash["schemaVersion"] >= 36 and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    occupied = set()
    for p in dash["panels"]:
        assert p["type"] in PANEL_TYPES and p["title"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in ("h", "w", "x", "y"))
        assert 1 <= g["w"] and g["x"] + g["w"] <= 24 and g["h"] >= 1
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")")
            assert t["expr"].count("{") == t["expr"].count("}")
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), var


def test_every_palsctl_series_it_queries_is_served_by_the_exporter(dash):
    served = _served_names()
    queried = {m for e in _exprs(dash) for m in METRIC.findall(e)}
    palsctl = {m for m in queried if m.startswith("palsctl_")}
    assert palsctl, queried
    for name in palsctl:
        assert name in served, f"the dashboard queries {name}, which the exporter does not serve"
    # each of the exporter's required series is on the dashboard
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in palsctl}
    assert REQUIRED <= shown, REQUIRED - shown


def test_it_puts_them_beside_dcgm_and_vllm_series(dash):
    queried = {m for e in _exprs(dash) for m in METRIC.findall(e)}
    assert "DCGM_FI_DEV_POWER_USAGE" in queried
    known_vllm = {vllm_metrics.GENERATION_TOKENS, vllm_metrics.RUNNING, vllm_metrics.WAITING,
                  *vllm_metrics.KV_USAGE_NAMES}
    known_vllm |= {f"{n}_bucket" for n in (*vllm_metrics.TTFT_NAMES, *vllm_metrics.ITL_NAMES)}
    vllm = {m for m in queried if m.startswith("vllm:")}
    assert len(vllm) >= 5 and vllm <= known_vllm, vllm - known_vllm
    # every panel that shows a palsctl series joins on the labels DCGM and vLLM use
    for e in _exprs(dash):
        if "palsctl_power_cap_watts" in e or "DCGM_FI_DEV_POWER_USAGE" in e:
            assert 'gpu=~"$gpu"' in e
        if e.startswith(("palsctl_", "vllm:")) or "rate(vllm:" in e:
            assert 'model_name=~"$model_name"' in e
