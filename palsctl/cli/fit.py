"""``palsctl fit PROFILE.csv``: fit a power-performance model and save it as JSON."""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main"]

HELP = "fit a power-performance model (parametric, gbt or forest) to a profile CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl fit`` to its parser."""
    from palsctl.cli.options import deprecated_alias

    parser.add_argument("profile", metavar="PROFILE", help="CSV written by `palsctl profile`")
    parser.add_argument("--model-file", metavar="PATH", default="model.json", dest="out",
                        help="power-performance model file to write (default: model.json)")
    deprecated_alias(parser, "--out", "--model-file", dest="out", metavar="PATH")
    parser.add_argument("--kind", choices=("parametric", "gbt", "forest"), default="parametric",
                        help="parametric (physical, few parameters) or tree ensembles "
                             "(default: parametric)")
    parser.add_argument("--folds", type=int, default=5, metavar="K",
                        help="k of the k-fold cross-validated MAPE (0: skip; default 5)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="fit seed (default 0)")
    parser.add_argument("--plot", metavar="PNG",
                        help="draw measured vs predicted and the tokens/J surface with the "
                             "efficient frontier")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl fit`` with parsed options; return the exit status."""
    import math

    from palsctl.errors import ConfigError
    from palsctl.models import PowerPerfModel
    from palsctl.models.power_perf import read_rows

    if args.folds < 0:
        raise ConfigError("must be >= 0", key="--folds", value=args.folds)
    rows = read_rows(args.profile)
    model = PowerPerfModel.fit(rows, kind=args.kind, cv_folds=args.folds, seed=args.seed)
    model.save(args.out)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.kind} model from {model.n_points} points "
                        f"({model.plant.get('model', '?')} on {model.num_gpus} x "
                        f"{model.plant.get('gpu', '?')})")
    table.add_column("target")
    table.add_column(f"{args.folds}-fold CV MAPE" if args.folds else "CV MAPE", justify="right")
    table.add_column("in-sample MAPE", justify="right")
    for t, v in model.fit_mape.items():
        cv = model.cv_mape.get(t, math.nan)
        table.add_row(t, "n/a" if math.isnan(cv) else f"{cv:.1%}",
                      "n/a" if math.isnan(v) else f"{v:.1%}")
    Console().print(table)
    print(f"model -> {args.out}")
    if args.plot:
        from palsctl.models.plot import plot_model

        print(f"plot -> {plot_model(model, rows, args.plot)}")
    return 0
