"""The fleet schema: one TOML file, pools of identical replicas under one site budget.

::

    name = "site"
    duration_s = 1800.0
    dt_s = 1.0
    seed = 0
    [site]
    power_budget_w = { steps = [[0.0, 12000.0], [600.0, 7000.0]] }  # every [setpoint] form
    # power_target_w = ...     # instead: tracking mode (demand response), split the same way
    period_s = 5.0             # allocation period
    policy = "marginal"        # equal | proportional | marginal
    reserve_w = 0.0            # watts held back from the budget
    lease_s = 15.0             # how long a granted share stays valid (default 3 periods)
    [[pool]]
    name = "mixtral"
    replicas = 4
    router = "jsq"             # round-robin | jsq | power-aware
    plant = { model = "mixtral-8x7b", gpu = "a100-sxm4-80gb", num_gpus = 4 }
    workload = { kind = "azure-conv", load = 0.6 }   # load: of the pool's full-power capacity
    setpoint = { throughput_tok_s = "demand", tpot_slo_s = 0.1, ttft_slo_s = 2.0 }
    controller = { name = "search" }
    # guard = { max_cap_change_w = 50.0 }

A pool's ``[plant]``, ``[workload]``, ``[setpoint]``, ``[controller]`` and ``[guard]`` are
validated by the experiment schema (`palsctl.experiment.experiment_from_dict`), so they accept
every form an experiment does, with two differences: the site, not the pool, sets the power
budget or target, and a pool's setpoint may give its throughput target per replica as a
fraction of one replica's full-power throughput, ``throughput_frac = 0.9``. A workload's
``load`` is relative to the whole pool's full-power capacity (replicas × one replica's).
Errors name the file, the key (``pool[1].plant.model``) and the value.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from palsctl.errors import ConfigError

__all__ = ["FleetConfig", "PoolConfig", "SiteConfig", "fleet_from_dict", "load_fleet",
           "ROUTERS", "pool_experiment", "parse_fleet_text", "replica_names", "with_controller"]

ROUTERS = ("round-robin", "jsq", "power-aware")
_POLICIES = ("equal", "proportional", "marginal")
_POOL_KEYS = ("name", "replicas", "router", "plant", "workload", "setpoint", "controller", "guard")
_SITE_KEYS = ("power_budget_w", "power_target_w", "period_s", "policy", "reserve_w", "lease_s")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """The site: ``power_budget_w`` or ``power_target_w`` (a validated setpoint spec: a number
    or a schedule table), the allocation ``period_s``, ``policy``, ``reserve_w``, ``lease_s``."""

    power_budget_w: Any
    power_target_w: Any
    period_s: float
    policy: str
    reserve_w: float
    lease_s: float

    @property
    def tracking(self) -> bool:
        """True in power-target (demand-response) mode."""
        return self.power_target_w is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """One pool: ``replicas`` identical replicas behind one ``router``; ``experiment`` is the
    pool's replica as a validated `palsctl.experiment.ExperimentConfig` (its workload is the
    pool's whole stream, its setpoint has no budget); ``throughput_frac`` the per-replica
    target as a fraction of one replica's full-power throughput (None: not used)."""

    name: str
    replicas: int
    router: str
    experiment: Any
    throughput_frac: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FleetConfig:
    """A validated fleet file (`load_fleet`).

    Parameters
    ----------
    name : str
        The fleet's name (it names the results folder).
    duration_s : float
        Length of the run, s.
    dt_s : float
        Control period of the replicas, s.
    seed : int
        Base seed of the replicas' plants and workloads.
    site : SiteConfig
        The site: budget or target, allocation period, policy, reserve, lease.
    pools : tuple of PoolConfig
        The pools of identical replicas.
    source : str or None
        The file it came from (for error messages).
    base_dir : Path or None
        Where relative paths start.
    """

    name: str
    duration_s: float
    dt_s: float
    seed: int
    site: SiteConfig
    pools: tuple[PoolConfig, ...]
    source: str | None = None
    base_dir: Path | None = None

    @property
    def num_replicas(self) -> int:
        """Replicas over every pool."""
        return sum(p.replicas for p in self.pools)

    def with_overrides(self, **changes: Any) -> "FleetConfig":
        """A copy with top-level fields replaced (``duration_s``, ``seed``...); ``policy``
        replaces the site's allocation policy."""
        policy = changes.pop("policy", None)
        cfg = dataclasses.replace(self, **changes)
        if policy is not None:
            if policy not in _POLICIES:
                raise ConfigError(f"must be one of {', '.join(_POLICIES)}", key="site.policy",
                                  value=policy)
            cfg = dataclasses.replace(cfg, site=dataclasses.replace(cfg.site, policy=policy))
        if "duration_s" in changes or "dt_s" in changes or "seed" in changes:
            cfg = dataclasses.replace(cfg, pools=tuple(
                dataclasses.replace(p, experiment=p.experiment.with_overrides(
                    duration_s=cfg.duration_s, dt_s=cfg.dt_s, seed=cfg.seed))
                for p in cfg.pools))
        return cfg


def with_controller(fleet: FleetConfig, name: str, **params: Any) -> FleetConfig:
    """The same fleet with every pool running controller ``name`` (its defaults, updated with
    ``params``; checked when the controllers are built)."""
    pools = []
    for p in fleet.pools:
        exp = p.experiment.with_controller(name)
        if params:
            exp = exp.with_overrides(controller_params={**exp.controller_params, **params})
        pools.append(dataclasses.replace(p, experiment=exp))
    return dataclasses.replace(fleet, pools=tuple(pools))


def _err(file: str | None, key: str, msg: str, value: Any = None) -> ConfigError:
    return ConfigError(msg, file=file, key=key, value=value)


def _number(file, key, x, *, lo=None, lo_open=False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise _err(file, key, "must be a finite number", x)
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise _err(file, key, f"must be {'>' if lo_open else '>='} {lo:g}", x)
    return float(x)


def _rekey(exc: ConfigError, prefix: str, file: str | None) -> ConfigError:
    """The experiment validator's errors (all of them), with the keys under the pool's
    prefix."""
    return ConfigError.collect([
        ConfigError(e.message, file=file, key=f"{prefix}.{e.key}" if e.key else prefix,
                    value=e.value) for e in exc.errors])


def _setpoint_spec(file: str | None, key: str, x: Any, base_dir: Path | None) -> Any:
    """Validate a site budget/target with the experiment's setpoint validator."""
    from palsctl.experiment.schema import setpoint_value

    return setpoint_value(x, key=key, file=file, base_dir=base_dir)


def pool_experiment(raw_pool: dict[str, Any], *, top: dict[str, Any], index: int,
                    file: str | None, base_dir: Path | None):
    """Validate one pool's tables with the experiment validator; returns
    ``(ExperimentConfig, throughput_frac)``."""
    from palsctl.experiment import experiment_from_dict

    prefix = f"pool[{index}]"
    setpoint = raw_pool.get("setpoint", {})
    if not isinstance(setpoint, dict):
        raise _err(file, f"{prefix}.setpoint", "must be a table", setpoint)
    setpoint = dict(setpoint)
    for k in ("power_budget_w", "power_target_w"):
        if k in setpoint:
            raise _err(file, f"{prefix}.setpoint.{k}", "the site sets the power budget and "
                       "target ([site]), not a pool", setpoint[k])
    frac = setpoint.pop("throughput_frac", None)
    if frac is not None:
        frac = _number(file, f"{prefix}.setpoint.throughput_frac", frac, lo=0, lo_open=True)
        if frac > 1.0:
            raise _err(file, f"{prefix}.setpoint.throughput_frac",
                       "must be <= 1 (a fraction of the full-power throughput)", frac)
        if "throughput_tok_s" in setpoint:
            raise _err(file, f"{prefix}.setpoint.throughput_frac",
                       "give throughput_tok_s or throughput_frac, not both", frac)
    raw = {"name": top["name"], "duration_s": top["duration_s"], "dt_s": top["dt_s"],
           "seed": top["seed"], "setpoint": setpoint}
    for k in ("plant", "workload", "controller", "guard"):
        if k in raw_pool:
            raw[k] = raw_pool[k]
    if "controller" not in raw:
        raise _err(file, f"{prefix}.controller", "missing required table")
    try:
        cfg = experiment_from_dict(raw, file=file, base_dir=base_dir)
    except ConfigError as exc:
        raise _rekey(exc, prefix, file) from None
    if frac is not None and cfg.plant.get("kind", "sim") != "sim":
        raise _err(file, f"{prefix}.setpoint.throughput_frac",
                   "needs a simulated plant (its full-power capacity is computed)", frac)
    return cfg, frac


def fleet_from_dict(raw: dict[str, Any], *, file: str | None = None,
                    base_dir: Path | None = None) -> FleetConfig:
    """Validate a parsed fleet TOML document (see the module doc).

    Parameters
    ----------
    raw : dict
        The parsed document.
    file : str or None
        The file it came from (named in the errors).
    base_dir : Path or None
        Where relative paths start.

    Returns
    -------
    FleetConfig
        The validated fleet.

    Raises
    ------
    ConfigError
        Every error found, one line each.
    """
    if not isinstance(raw, dict):
        raise _err(file, "", "a fleet file must be a TOML table", raw)
    known = ("name", "duration_s", "dt_s", "seed", "site", "pool")
    for k in raw:
        if k not in known:
            raise _err(file, k, f"unknown key; known: {', '.join(known)}", raw[k])
    name = raw.get("name", "fleet")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name \
            or name in (".", ".."):
        raise _err(file, "name", "must be a plain name (it names the results folder)", name)
    if "duration_s" not in raw:
        raise _err(file, "duration_s", "missing required key")
    duration = _number(file, "duration_s", raw["duration_s"], lo=0, lo_open=True)
    dt = _number(file, "dt_s", raw.get("dt_s", 1.0), lo=0, lo_open=True)
    if duration < dt:
        raise _err(file, "duration_s", f"must be at least dt_s ({dt:g} s)", duration)
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _err(file, "seed", "must be an integer >= 0", seed)

    sraw = raw.get("site")
    if not isinstance(sraw, dict):
        raise _err(file, "site", "missing required table" if sraw is None else "must be a table",
                   sraw)
    for k in sraw:
        if k not in _SITE_KEYS:
            raise _err(file, f"site.{k}", f"unknown key; known: {', '.join(_SITE_KEYS)}", sraw[k])
    has_b, has_t = "power_budget_w" in sraw, "power_target_w" in sraw
    if has_b == has_t:
        raise _err(file, "site.power_budget_w", "give exactly one of power_budget_w "
                   "(a ceiling) and power_target_w (tracking mode)")
    budget = _setpoint_spec(file, "site.power_budget_w", sraw["power_budget_w"], base_dir) \
        if has_b else None
    target = _setpoint_spec(file, "site.power_target_w", sraw["power_target_w"], base_dir) \
        if has_t else None
    period = _number(file, "site.period_s", sraw.get("period_s", 5.0), lo=0, lo_open=True)
    if period < dt:
        raise _err(file, "site.period_s", f"must be at least dt_s ({dt:g} s)", period)
    policy = sraw.get("policy", "marginal")
    if policy not in _POLICIES:
        raise _err(file, "site.policy", f"must be one of {', '.join(_POLICIES)}", policy)
    reserve = _number(file, "site.reserve_w", sraw.get("reserve_w", 0.0), lo=0)
    lease = _number(file, "site.lease_s", sraw.get("lease_s", 3.0 * period), lo=0, lo_open=True)
    if lease < period:
        raise _err(file, "site.lease_s", f"must be at least period_s ({period:g} s)", lease)
    site = SiteConfig(power_budget_w=budget, power_target_w=target, period_s=period,
                      policy=policy, reserve_w=reserve, lease_s=lease)

    praw = raw.get("pool")
    if not isinstance(praw, list) or not praw:
        raise _err(file, "pool", "needs at least one [[pool]] table", praw)
    top = {"name": name, "duration_s": duration, "dt_s": dt, "seed": seed}
    pools: list[PoolConfig] = []
    names: set[str] = set()
    replica_pool: dict[str, str] = {}  # replica name -> its pool (it names a results folder)
    for i, p in enumerate(praw):
        prefix = f"pool[{i}]"
        if not isinstance(p, dict):
            raise _err(file, prefix, "must be a table", p)
        for k in p:
            if k not in _POOL_KEYS:
                raise _err(file, f"{prefix}.{k}", f"unknown key; known: {', '.join(_POOL_KEYS)}",
                           p[k])
        pname = p.get("name", f"pool{i}")
        if not isinstance(pname, str) or not pname or "/" in pname or "\\" in pname \
                or pname in (".", "..") or pname in names:
            raise _err(file, f"{prefix}.name", "must be a plain, unique name", pname)
        names.add(pname)
        n = p.get("replicas", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise _err(file, f"{prefix}.replicas", "must be an integer in [1, 4096]", n)
        for r in replica_names(pname, n):
            if r in replica_pool:
                raise _err(file, f"{prefix}.name", f"its replica {r!r} has the name of a "
                           f"replica of pool {replica_pool[r]!r}; rename one of the pools",
                           pname)
            replica_pool[r] = pname
        router = p.get("router", "jsq")
        if router not in ROUTERS:
            raise _err(file, f"{prefix}.router", f"must be one of {', '.join(ROUTERS)}", router)
        exp, frac = pool_experiment(p, top=top, index=i, file=file, base_dir=base_dir)
        pools.append(PoolConfig(name=pname, replicas=n, router=router, experiment=exp,
                                throughput_frac=frac))
    return FleetConfig(name=name, duration_s=duration, dt_s=dt, seed=seed, site=site,
                       pools=tuple(pools), source=file, base_dir=base_dir)


def replica_names(pool: str, replicas: int) -> list[str]:
    """The names of a pool's replicas: the pool's own for one replica, else ``<pool>-<i>``.

    Parameters
    ----------
    pool : str
        The pool's name.
    replicas : int
        How many replicas it has.

    Returns
    -------
    list of str
        One name per replica (each names the replica's results folder).
    """
    return [pool] if replicas == 1 else [f"{pool}-{i}" for i in range(replicas)]


def load_fleet(path: str | Path) -> FleetConfig:
    """Load and validate a fleet TOML file.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    FleetConfig
        The validated fleet.
    """
    from palsctl.experiment import read_toml

    p = Path(path)
    return fleet_from_dict(read_toml(p), file=str(p), base_dir=p.resolve().parent)


def parse_fleet_text(text: str, *, file: str = "<fleet>") -> FleetConfig:
    """Validate fleet TOML given as text (tests, embedded examples)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=file) from None
    return fleet_from_dict(raw, file=file)
