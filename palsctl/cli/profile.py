"""``palsctl profile [CONFIG]``: measure the plant's saturated steady state over (cap x batch)."""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main"]

HELP = ("profile the configured plant (default: the default experiment's) over power caps x "
        "batch sizes into a resumable CSV")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl profile`` to its parser."""
    from palsctl.cli.options import deprecated_alias

    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help="experiment TOML whose [plant] (and workload lengths) to profile "
                             "(default: the embedded default experiment)")
    parser.add_argument("--caps", metavar="W",
                        help="per-GPU caps: START:STOP:STEP or a comma list (default: 7 caps "
                             "evenly over the plant's cap range)")
    parser.add_argument("--batches", metavar="LIST",
                        help="batch sizes, comma list (default: 1,2,4,...,64 within the plant's "
                             "launch batch)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="profile a space-filling subset of N grid points (corners, centre, "
                             "Latin-hypercube-like maximin fill)")
    parser.add_argument("--refine", type=int, default=0, metavar="K",
                        help="then fit a parametric model and profile K more grid points where "
                             "it places the tokens/J-best configurations for a range of "
                             "throughput targets (default 0)")
    parser.add_argument("--csv", metavar="PATH", default="profile.csv", dest="out",
                        help="the profile CSV to write; an existing file is resumed (default: "
                             "profile.csv)")
    deprecated_alias(parser, "--out", "--csv", dest="out", metavar="PATH")
    parser.add_argument("--warmup-s", type=float, default=30.0, metavar="S",
                        help="warm-up per point before measuring (default: 30)")
    parser.add_argument("--window-s", type=float, default=60.0, metavar="S",
                        help="steady measurement window per point (default: 60)")
    parser.add_argument("--prompt-tokens", type=int, metavar="N",
                        help="prompt length of the saturating requests (default: the "
                             "workload's mean)")
    parser.add_argument("--output-tokens", type=int, metavar="N",
                        help="output length of the saturating requests (default: the "
                             "workload's mean)")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="sweep seed (default: the experiment's seed); each point's plant is "
                             "seeded from (seed, cap, batch)")
    parser.add_argument("--parallelism", choices=("tp", "ep", "tp+ep"),
                        help="how the simulated plant splits the model over its GPUs: tensor "
                             "parallel, expert parallel with data-parallel attention, or expert "
                             "parallel MoE layers with tensor-parallel attention (default: the "
                             "config's [plant] parallelism)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl profile`` with parsed options; return the exit status."""
    from pathlib import Path

    from palsctl.errors import ConfigError
    from palsctl.experiment import build_plant, build_workload, load_experiment
    from palsctl.models.profile import (
        default_grid,
        grid_points,
        parse_batches,
        parse_caps,
        sample_points,
    )

    cfg = load_experiment(args.config)
    if args.parallelism is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, plant={**cfg.plant, "parallelism": args.parallelism})
    seed = cfg.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError("must be >= 0", key="--seed", value=seed)
    for key, v in (("--warmup-s", args.warmup_s), ("--window-s", args.window_s)):
        if not (v >= 0) or (key == "--window-s" and v <= 0):
            raise ConfigError("must be a positive number of seconds", key=key, value=v)
    prompt, output = args.prompt_tokens, args.output_tokens
    if prompt is None or output is None:
        workload = build_workload(cfg, seed=seed)
        if workload is None:
            raise ConfigError("the experiment has no workload; pass --prompt-tokens and "
                              "--output-tokens", file=cfg.source, key="workload.kind")
        prompt = prompt if prompt is not None else max(1, round(workload.mean_prompt_tokens))
        output = output if output is not None else max(1, round(workload.mean_output_tokens))
    for key, v in (("--prompt-tokens", prompt), ("--output-tokens", output)):
        if v < 1:
            raise ConfigError("must be >= 1", key=key, value=v)

    def make(point_seed: int):
        return build_plant(cfg, seed=point_seed)

    probe = make(seed)
    try:
        limits = probe.limits
    finally:
        probe.close()
    caps, batches = default_grid(limits)
    if args.caps:
        caps = parse_caps(args.caps)
        bad = [c for c in caps if not limits.power_cap_min_w <= c <= limits.power_cap_max_w]
        if bad:
            raise ConfigError(f"cap outside the plant's range [{limits.power_cap_min_w:g}, "
                              f"{limits.power_cap_max_w:g}] W", key="--caps", value=bad[0])
    if args.batches:
        batches = parse_batches(args.batches)
        bad = [b for b in batches if not limits.max_batch_min <= b <= limits.max_batch_max]
        if bad:
            raise ConfigError(f"batch outside the plant's range [{limits.max_batch_min}, "
                              f"{limits.max_batch_max}]", key="--batches", value=bad[0])
    if args.sample is not None:
        if args.sample < 1:
            raise ConfigError("must be >= 1", key="--sample", value=args.sample)
        points = sample_points(caps, batches, args.sample, seed=seed)
    else:
        points = grid_points(caps, batches)
    if args.refine < 0:
        raise ConfigError("must be >= 0", key="--refine", value=args.refine)
    out = Path(args.out)
    kw = dict(warmup_s=args.warmup_s, window_s=args.window_s, prompt_tokens=int(prompt),
              output_tokens=int(output), out_csv=out, seed=seed)
    desc = (f"{cfg.plant.get('model', '?')} on {cfg.plant.get('num_gpus', '?')} x "
            f"{cfg.plant.get('gpu', '?')} ({cfg.plant.get('parallelism', 'tp')})")
    rows = _sweep(make, points, kw, desc, args.quiet)
    if args.refine:
        from palsctl.models import PowerPerfModel
        from palsctl.models.profile import frontier_points

        first = PowerPerfModel.fit(rows, kind="parametric", seed=seed, cv_folds=0)
        more = frontier_points(first, caps, batches, args.refine, exclude=points)
        rows += _sweep(make, more, kw, desc + " (refine)", args.quiet)
    print(f"profiled {len(rows)} points of {desc} (prompt {prompt}, output {output} tokens) "
          f"-> {out}")
    return 0


def _sweep(make, points, kw, desc, quiet):
    from palsctl.models.profile import profile_plant

    if quiet:
        return profile_plant(make, points, **kw)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[last]}"), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(f"profile {desc}", total=len(points), last="")

        def progress(done: int, total: int, row: dict) -> None:
            bar.update(task, completed=done,
                       last=f"{row['power_cap_w']:g} W x {row['max_batch']}: "
                            f"{row['throughput_tok_s']:.0f} tok/s, {row['power_w']:.0f} W")

        return profile_plant(make, points, progress=progress, **kw)
