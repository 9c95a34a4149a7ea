"""``palsctl analyze CONFIG``: offline stability analysis of the experiment's loops.

Identifies each loop of the `pi` controller (batch and margin loops under a loose budget, the
budget loop under a tight one) at low / medium / high load on the experiment's simulated plant,
from step tests and from the offline power-performance model's gradients, and prints for each
its verdict with the model's fit to the step test beside it (a model that does not fit makes
the loop "unverified", never "stable"), the closed-loop poles, the gain and phase margins, the
step-response metrics of the configured gains and the gains recommended for ≥ 6 dB / ≥ 45°.
Slow loops are flagged sluggish; ``--verify`` closes each loop on the simulated plant and
checks the predicted settling time and overshoot. Every controller analysed (`pi`, ``search``,
``mpc``, ...) also gets empirical closed-loop budget steps of the whole controller. ``--out``
writes Bode, step-response and stability-map PNGs. ``--strict`` exits with status 1 unless
every loop is stable.
"""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main"]

HELP = ("stability analysis of the loops at several operating points: verdicts with their fit, "
        "margins, settling, Bode/step plots")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl analyze`` to its parser."""
    from palsctl.cli.options import deprecated_alias

    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="experiment TOML file (default: the embedded default experiment)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the full report as JSON ('-': stdout)")
    parser.add_argument("--out", metavar="DIR",
                        help="folder for the plots: Bode and step-response PNGs per loop and "
                             "operating point, and (Kp, Ki) stability maps")
    deprecated_alias(parser, "--plot", "--out", dest="out", metavar="DIR")
    parser.add_argument("--model-file", metavar="PATH", dest="model_file",
                        help="power-performance model JSON (palsctl fit) for the gradient-based "
                             "estimate (default: profile the simulated plant and fit one)")
    deprecated_alias(parser, "--model", "--model-file", dest="model_file", metavar="PATH")
    parser.add_argument("--no-model", action="store_true",
                        help="step tests only: skip the model-gradient estimate")
    parser.add_argument("--controllers", metavar="A,B,...",
                        help="controllers to analyse, comma-separated (default: pi and the "
                             "config's controller): each gets closed-loop budget steps on the "
                             "simulated plant; pi's loops are also analysed on their linear "
                             "models")
    parser.add_argument("--verify", action="store_true",
                        help="close each pi loop whose model fits on the simulated plant and "
                             "check the predicted settling time and overshoot")
    parser.add_argument("--min-gm-db", type=float, default=6.0, metavar="DB",
                        help="required gain margin (default 6 dB)")
    parser.add_argument("--min-pm-deg", type=float, default=45.0, metavar="DEG",
                        help="required phase margin (default 45 deg)")
    parser.add_argument("--max-settling-s", type=float, default=60.0, metavar="S",
                        help="a loop settling slower than this is flagged sluggish (default 60 s)")
    parser.add_argument("--load", default="low,medium,high", metavar="LIST",
                        help="operating points' load levels, comma-separated (low,medium,high)")
    parser.add_argument("--budget", default="loose,tight", metavar="LIST",
                        help="operating points' budgets, comma-separated (loose,tight)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 unless every loop is stable (fits its model, "
                             "meets the margins, settles in time)")


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


_STYLE = {"stable": "[green]stable[/]", "sluggish": "[yellow]SLUGGISH[/]",
          "under margins": "[yellow]UNDER MARGINS[/]", "prediction off": "[red]PREDICTION OFF[/]",
          "UNSTABLE": "[bold red]UNSTABLE[/]", "unverified": "[yellow]UNVERIFIED[/]",
          "oscillates": "[bold red]OSCILLATES[/]", "does not settle": "[red]DOES NOT SETTLE[/]"}

_UNITS = {"batch": ("tok/s per sequence", "seq per tok/s", "seq per token"),
          "margin": ("tok/s per W", "W per tok/s", "W per token"),
          "budget": ("W per W", "W/W", "W/W per s")}


def _controller_names(args, cfg) -> list[str]:
    from palsctl.errors import ConfigError
    from palsctl.registry import available

    if args.controllers is None:   # pi's loops, and the config's controller when it is another
        return list(dict.fromkeys(["pi", cfg.controller_name]))
    names = [x.strip() for x in str(args.controllers).split(",") if x.strip()]
    known = set(available())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(f"unknown controller; known: {', '.join(sorted(known))}",
                          key="--controllers", value=args.controllers)
    return list(dict.fromkeys(names))


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl analyze`` with parsed options; return the exit status."""
    import json
    import math
    import sys
    import warnings

    from rich.console import Console

    from palsctl.analysis.report import (
        AnalysisReport,
        analyze_points,
        empirical_steps,
        fmt,
        operating_points,
        pi_gains,
        plot_bode,
        plot_maps,
        plot_steps,
    )
    from palsctl.cli.options import not_the_input
    from palsctl.controllers.pi import PIConfig
    from palsctl.errors import ConfigError, ModelFileError
    from palsctl.experiment import build_workload, load_experiment
    from palsctl.registry import make_controller

    for name, v in (("--min-gm-db", args.min_gm_db), ("--min-pm-deg", args.min_pm_deg)):
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError("must be a finite number >= 0", key=name, value=v)
    if not (math.isfinite(args.max_settling_s) and args.max_settling_s > 0):
        raise ConfigError("must be a number of seconds > 0", key="--max-settling-s",
                          value=args.max_settling_s)
    loads = _choices(args.load, ("low", "medium", "high"), "--load")
    budgets = _choices(args.budget, ("loose", "tight"), "--budget")
    cfg = load_experiment(args.config)
    not_the_input("--json", args.json, args.config, "experiment file")
    if cfg.plant.get("kind") != "sim":
        raise ConfigError("palsctl analyze identifies the loops on the simulated plant: needs "
                          "plant.kind = \"sim\"", file=cfg.source, key="plant.kind",
                          value=cfg.plant.get("kind"))
    names = _controller_names(args, cfg)
    linear = "pi" in names
    empirical = names          # every controller, pi included, is also step-tested as a whole
    if "pi" == cfg.controller_name:
        pi_cfg = PIConfig.from_dict(cfg.controller_params, file=cfg.source)
    else:
        pi_cfg = PIConfig()
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
    console = Console(stderr=args.json == "-")
    power_model = None
    model_file = getattr(args, "model_file", None)
    if model_file and args.no_model:
        raise ConfigError("give --model-file or --no-model, not both", key="--model-file",
                          value=model_file)
    if not linear and (model_file or args.verify):
        raise ConfigError("--model-file and --verify apply to the pi loops: add pi to "
                          "--controllers", key="--controllers", value=",".join(names))
    if linear and model_file:
        from palsctl.models import PowerPerfModel
        try:
            power_model = PowerPerfModel.load(model_file)
        except (OSError, ModelFileError) as exc:
            raise ConfigError(f"cannot load the model: {exc}", key="--model-file",
                              value=model_file) from None
    elif linear and not args.no_model:
        from palsctl.models import build_model_for
        console.print("profiling the simulated plant for the offline model ...")
        power_model = build_model_for(p["model"], p["gpu"], p["num_gpus"],
                                      prompt_tokens=int(prompt), output_tokens=int(output),
                                      seed=cfg.seed)
    common = dict(model=p["model"], gpu=p["gpu"], num_gpus=p["num_gpus"],
                  max_batch_launch=p["max_batch_launch"], dt_s=cfg.dt_s, prompt_tokens=prompt,
                  output_tokens=output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model range warnings: reported per point instead
        from palsctl.plants.sim import SimPlant

        probe = SimPlant(p["model"], p["gpu"], p["num_gpus"], dt_s=cfg.dt_s, noise=False,
                         max_batch_launch=p["max_batch_launch"])
        points = [pt for pt in operating_points(
            model=p["model"], gpu=p["gpu"], num_gpus=p["num_gpus"],
            max_batch_launch=p["max_batch_launch"], cap_min_w=probe.limits.power_cap_min_w,
            cap_max_w=probe.limits.power_cap_max_w, prompt_tokens=prompt, output_tokens=output)
            if pt.load in loads and pt.budget in budgets]
        probe.close()
        if linear:
            if cfg.controller_name != "pi":
                console.print(f"note: the config's controller is {cfg.controller_name!r}: the "
                              f"pi loops are analysed with pi's default gains", highlight=False)
            report = analyze_points(experiment=cfg.name, points=points,
                                    gains=pi_gains(pi_run_gains),
                                    power_model=power_model, min_gm_db=args.min_gm_db,
                                    min_pm_deg=args.min_pm_deg, seed=cfg.seed,
                                    max_settling_s=args.max_settling_s, verify=args.verify,
                                    **common)
            report.notes.append(f"pi gains: {gains_source}")
        else:
            report = AnalysisReport(experiment=cfg.name, plant=dict(p), dt_s=cfg.dt_s,
                                    gains={})
        if not any(pt.budget == "tight" for pt in points):
            if not linear:
                raise ConfigError("closed-loop budget steps need the tight-budget points",
                                  key="--budget", value=args.budget)
            report.notes.append("no closed-loop budget steps: they run at the tight-budget "
                                "points")
            empirical = []
        if empirical:
            console.print(f"closed-loop budget steps of {', '.join(empirical)} on the "
                          f"simulated plant ...", highlight=False)
            factories = {n: (lambda n=n: make_controller(
                n, **(cfg.controller_params if n == cfg.controller_name else {})))
                for n in empirical}
            empirical_steps(report, factories, points=points, seed=cfg.seed,
                            max_settling_s=args.max_settling_s, **common)

    current = None
    for r in report.loops:
        a, pl = r.analysis, r.analysis.plant
        if r.point.name != current:
            current = r.point.name
            console.print(f"\n[bold]{r.point.name}[/]: batch {r.point.max_batch}, cap "
                          f"{r.point.power_cap_w:.0f} W per GPU (the cap binds between the "
                          f"power floor {r.point.power_floor_per_gpu_w:.0f} W and the natural "
                          f"draw {r.point.natural_draw_per_gpu_w:.0f} W per GPU)",
                          highlight=False)
        u = _UNITS[r.loop]
        fit = "no step test" if r.fit is None else r.fit.text()
        console.print(f"  {r.loop} loop ({r.model_source} model, {fit}): "
                      f"{_STYLE[r.verdict]} — {r.reason()}", highlight=False)
        console.print(f"    K = {fmt(pl.gain)} {u[0]}, tau = {fmt(pl.tau_s, '.2f')} s, theta = "
                      f"{fmt(pl.delay_s, '.2f')} s, window = {fmt(pl.window_s, '.2f')} s; "
                      f"Kp = {fmt(a.kp)} {u[1]}, Ki = {fmt(a.ki)} {u[2]}", highlight=False)
        console.print(f"    poles {_poles_text(a.poles)} (max |p| "
                      f"{fmt(a.spectral_radius, '.3f')}); GM {fmt(a.gain_margin_db, '.1f')} dB, "
                      f"PM {fmt(a.phase_margin_deg, '.0f')} deg; step: rise "
                      f"{fmt(a.step.rise_time_s)} s, overshoot "
                      f"{fmt(a.step.overshoot_pct, '.0f')} %, settling "
                      f"{fmt(a.step.settling_time_s)} s", highlight=False)
        if r.recommended_kp is not None:
            console.print(f"    recommended (GM >= {args.min_gm_db:g} dB, PM >= "
                          f"{args.min_pm_deg:g} deg, fastest): Kp = {fmt(r.recommended_kp)}, "
                          f"Ki = {fmt(r.recommended_ki)} (settling "
                          f"{fmt(r.recommended_settling_s)} s)", highlight=False)
        if r.verification is not None:
            console.print(f"    verify: {r.verification.text()}", highlight=False)
        for n in r.notes:
            console.print(f"    note: {n}", highlight=False)
    if report.empirical:
        console.print("\n[bold]closed-loop budget steps[/] (simulated plant, saturated, a "
                      "throughput target above what the budget allows, no safety guard):")
    for e in report.empirical:
        s = e.step
        how = (f"settling {fmt(s.settling_time_s)} s (±{100 * s.band:.0f} % of the step)"
               if s.decays else f"still swinging {s.tail_swing_pct:.0f} % of the step peak to "
                                f"peak at the end of {s.t_s[-1]:.0f} s")
        console.print(f"  {s.controller}, {e.point.name}: budget {s.budget_before_w:.0f} -> "
                      f"{s.budget_after_w:.0f} W: {_STYLE[e.verdict]} — {how}, "
                      f"overshoot {fmt(s.overshoot_pct, '.0f')} %, "
                      f"{s.time_over_budget_s:g} s over the new budget, final power "
                      f"{s.final_power_w:.0f} W", highlight=False)
    console.print()
    for n in dict.fromkeys(report.notes):
        console.print(f"note: {n}", highlight=False)
    console.print(report.summary(min_gm_db=args.min_gm_db, min_pm_deg=args.min_pm_deg,
                                 max_settling_s=args.max_settling_s), highlight=False)
    if args.out:
        paths = plot_maps(report, args.out) + plot_bode(report, args.out) + \
            plot_steps(report, args.out)
        console.print(f"wrote {len(paths)} plots to {args.out}", highlight=False)
    if args.json:
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False,
                          default=lambda o: None) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text)
    return 1 if (args.strict and not report.all_stable) else 0
