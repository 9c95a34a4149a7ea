"""``palsctl analyze CONFIG``: offline stability analysis of the configured PI loops.

Identifies each loop of the `pi` controller (batch and margin loops under a loose budget, the
budget loop under a tight one) at low / medium / high load on the experiment's simulated plant,
from step tests and from the offline power-performance model's gradients, and prints the
identified model, the closed-loop poles, the gain and phase margins and the step-response
metrics of the configured gains, with the gains recommended for ≥ 6 dB / ≥ 45°. Warns when a
loop is unstable or under the margins (exit status 1 with ``--strict``).
"""
from __future__ import annotations

import argparse

HELP = "stability analysis (python-control) of the configured PI gains at several operating points"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the full report as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="DIR",
                        help="write a (Kp, Ki) stability map PNG per loop and operating point")
    parser.add_argument("--model", metavar="PATH",
                        help="power-performance model JSON (palsctl fit) for the gradient-based "
                             "estimate (default: profile the simulated plant and fit one)")
    parser.add_argument("--no-model", action="store_true",
                        help="step tests only: skip the model-gradient estimate")
    parser.add_argument("--min-gm-db", type=float, default=6.0, metavar="DB",
                        help="required gain margin (default 6 dB)")
    parser.add_argument("--min-pm-deg", type=float, default=45.0, metavar="DEG",
                        help="required phase margin (default 45 deg)")
    parser.add_argument("--load", default="low,medium,high", metavar="LIST",
                        help="operating points' load levels, comma-separated (low,medium,high)")
    parser.add_argument("--budget", default="loose,tight", metavar="LIST",
                        help="operating points' budgets, comma-separated (loose,tight)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a loop is unstable or under the margins")


def _choices(text: str, known: tuple[str, ...], key: str) -> list[str]:
    from palsctl.errors import ConfigError

    items = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise ConfigError(f"choose from {', '.join(known)} (comma-separated)", key=key,
                          value=text)
    return items


def _poles_text(poles, n: int = 3) -> str:
    ps = sorted(poles, key=abs, reverse=True)[:n]
    out = []
    for p in ps:
        if abs(p.imag) < 1e-9:
            out.append(f"{p.real:.3f}")
        else:
            out.append(f"{p.real:.3f}{p.imag:+.3f}j")
    return ", ".join(out)


def main(args: argparse.Namespace) -> int:
    import json
    import math
    import sys

    from rich.console import Console

    from palsctl.analysis.report import analyze_points, fmt, pi_gains, plot_maps
    from palsctl.experiment import build_workload, load_experiment
    from palsctl.controllers.pi import PIConfig
    from palsctl.errors import ConfigError, ModelFileError

    for name, v in (("--min-gm-db", args.min_gm_db), ("--min-pm-deg", args.min_pm_deg)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError("must be a finite number >= 0", key=name, value=v)
    loads = _choices(args.load, ("low", "medium", "high"), "--load")
    budgets = _choices(args.budget, ("loose", "tight"), "--budget")
    cfg = load_experiment(args.config)
    if cfg.plant.get("kind") != "sim":
        raise ConfigError("palsctl analyze identifies the loops on the simulated plant: needs "
                          "plant.kind = \"sim\"", file=cfg.source, key="plant.kind",
                          value=cfg.plant.get("kind"))
    notes = []
    if cfg.controller_name == "pi":
        pi_cfg = PIConfig.from_dict(cfg.controller_params, file=cfg.source)
    else:
        pi_cfg = PIConfig()
        notes.append(f"controller {cfg.controller_name!r} is not the linear PI: analysing the "
                     f"pi controller's default gains")
    workload = build_workload(cfg)
    prompt = float(getattr(workload, "mean_prompt_tokens", 200.0) or 200.0)
    output = float(getattr(workload, "mean_output_tokens", 400.0) or 400.0)
    p = cfg.plant
    from palsctl.controllers.pi import resolve_gains

    # the gains the pi controller runs on this plant (the analysis's recommendation for the
    # ones its config leaves unset)
    pi_run_gains, gains_source = resolve_gains(
        pi_cfg, model=p["model"], gpu=p["gpu"], num_gpus=p["num_gpus"],
        max_batch_launch=p["max_batch_launch"], prompt_tokens=prompt, output_tokens=output,
        dt_s=cfg.dt_s)
    notes.append(f"pi gains: {gains_source}")
    console = Console(stderr=args.json == "-")
    power_model = None
    if args.model and args.no_model:
        raise ConfigError("give --model or --no-model, not both", key="--model", value=args.model)
    if args.model:
        from palsctl.models import PowerPerfModel
        try:
            power_model = PowerPerfModel.load(args.model)
        except (OSError, ModelFileError) as exc:
            raise ConfigError(f"cannot load the model: {exc}", key="--model",
                              value=args.model) from None
    elif not args.no_model:
        from palsctl.models import build_model_for
        console.print("profiling the simulated plant for the offline model ...")
        power_model = build_model_for(p["model"], p["gpu"], p["num_gpus"],
                                      prompt_tokens=int(prompt), output_tokens=int(output),
                                      seed=cfg.seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model range warnings: reported per point instead
        from palsctl.analysis.report import operating_points
        from palsctl.plants.sim import SimPlant

        probe = SimPlant(p["model"], p["gpu"], p["num_gpus"], dt_s=cfg.dt_s, noise=False,
                         max_batch_launch=p["max_batch_launch"])
        points = [pt for pt in operating_points(
            model=p["model"], gpu=p["gpu"], num_gpus=p["num_gpus"],
            max_batch_launch=p["max_batch_launch"], cap_min_w=probe.limits.power_cap_min_w,
            cap_max_w=probe.limits.power_cap_max_w, prompt_tokens=prompt, output_tokens=output)
            if pt.load in loads and pt.budget in budgets]
        probe.close()
        report = analyze_points(experiment=cfg.name, points=points, model=p["model"], gpu=p["gpu"],
                                num_gpus=p["num_gpus"], max_batch_launch=p["max_batch_launch"],
                                dt_s=cfg.dt_s, gains=pi_gains(pi_run_gains),
                                prompt_tokens=prompt,
                                output_tokens=output, power_model=power_model,
                                min_gm_db=args.min_gm_db, min_pm_deg=args.min_pm_deg,
                                seed=cfg.seed)
    report.notes[:0] = notes

    units = {"batch": ("tok/s per sequence", "seq per tok/s", "seq per token"),
             "margin": ("tok/s per W", "W per tok/s", "W per token"),
             "budget": ("W per W", "W/W", "W/W per s")}
    warnings_out = []
    current = None
    for r in report.loops:
        a = r.analysis
        pl = a.plant
        if r.point.name != current:
            current = r.point.name
            console.print(f"\n[bold]{r.point.name}[/]: batch {r.point.max_batch}, cap "
                          f"{r.point.power_cap_w:.0f} W per GPU (the cap binds between the power floor "
                          f"{r.point.power_floor_per_gpu_w:.0f} W and the natural draw "
                          f"{r.point.natural_draw_per_gpu_w:.0f} W per GPU)", highlight=False)
        u = units[r.loop]
        fit = "" if pl.fit_rms is None else f", fit RMS {fmt(pl.fit_rms)}"
        state = ("[bold red]UNSTABLE[/]" if not a.stable else
                 ("ok" if a.meets_margins else "[yellow]under margins[/]"))
        console.print(f"  {r.loop} loop ({r.model_source}): K = {fmt(pl.gain)} {u[0]}, "
                      f"tau = {fmt(pl.tau_s, '.2f')} s, theta = {fmt(pl.delay_s, '.2f')} s, "
                      f"window = {fmt(pl.window_s, '.2f')} s{fit}", highlight=False)
        console.print(f"    Kp = {fmt(a.kp)} {u[1]}, Ki = {fmt(a.ki)} {u[2]}: {state}; "
                      f"poles {_poles_text(a.poles)} (max |p| {fmt(a.spectral_radius, '.3f')})",
                      highlight=False)
        console.print(f"    GM {fmt(a.gain_margin_db, '.1f')} dB, PM "
                      f"{fmt(a.phase_margin_deg, '.0f')} deg; step: rise {fmt(a.step.rise_time_s)} s, overshoot "
                      f"{fmt(a.step.overshoot_pct, '.0f')} %, settling "
                      f"{fmt(a.step.settling_time_s)} s", highlight=False)
        if r.recommended_kp is not None:
            console.print(f"    recommended (GM >= {args.min_gm_db:g} dB, PM >= "
                          f"{args.min_pm_deg:g} deg, fastest): Kp = {fmt(r.recommended_kp)}, "
                          f"Ki = {fmt(r.recommended_ki)} (settling "
                          f"{fmt(r.recommended_settling_s)} s)", highlight=False)
        for w in r.warnings():
            warnings_out.append(f"{r.point.name}, {r.loop} loop ({r.model_source}): {w}")
        for n in r.notes:
            report.notes.append(f"{r.point.name}, {r.loop} loop ({r.model_source}): {n}")
    console.print()
    for n in dict.fromkeys(report.notes):
        console.print(f"note: {n}")
    for w in warnings_out:
        console.print(f"[bold red]WARNING[/]: {w}", highlight=False)
    if not warnings_out:
        console.print(f"all loops stable with GM >= {args.min_gm_db:g} dB and "
                      f"PM >= {args.min_pm_deg:g} deg")
    if args.plot:
        paths = plot_maps(report, args.plot)
        console.print(f"wrote {len(paths)} stability maps to {args.plot}")
    if args.json:
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False,
                          default=lambda o: None) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 1 if (args.strict and warnings_out) else 0
