"""Small fleet files shared by the fleet tests."""
from __future__ import annotations

from palsctl.cluster.schema import parse_fleet_text

PEAK_W = 4 * 700.0


def small_fleet(*, duration_s: float = 60.0, budget: str | None = None, policy: str = "marginal",
                controller: str = "pi", replicas: int = 4, lease_s: float = 10.0,
                router: str = "jsq", extra_site: str = "", load: float = 0.6):
    """``replicas`` Llama-3.1-8B replicas on one H100 each (max 700 W apiece)."""
    budget = budget or f"{{ steps = [[0.0, {PEAK_W}], [20.0, {0.6 * PEAK_W}]] }}"
    return parse_fleet_text(f"""
name = "t"
duration_s = {duration_s}
dt_s = 1.0
seed = 3
[site]
power_budget_w = {budget}
period_s = 5.0
policy = "{policy}"
lease_s = {lease_s}
{extra_site}
[[pool]]
name = "llama"
replicas = {replicas}
router = "{router}"
plant = {{ model = "llama-3.1-8b", gpu = "h100-sxm", num_gpus = 1, max_batch_launch = 128 }}
workload = {{ kind = "poisson", load = {load}, prompt_tokens_mean = 256, output_tokens_mean = 128 }}
setpoint = {{ throughput_tok_s = "demand", tpot_slo_s = 0.1 }}
controller = {{ name = "{controller}" }}
""")
