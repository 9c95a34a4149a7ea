"""``palsctl data list|fetch``: the public data sets, where palsctl looks for them, and their
download from the upstream repositories at pinned commits (sha256-verified, resumable)."""
from __future__ import annotations

import argparse

__all__ = ["HELP", "add_arguments", "main"]

HELP = "list the public data sets palsctl reads, or fetch them from their upstream repositories"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl data`` to its parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    ls = sub.add_parser("list", help="each data set: what it is, its license, and whether the "
                                     "data folder holds it",
                        description="List the public data sets and the data folder in use.")
    fe = sub.add_parser("fetch", help="download data sets (default: all) into the data folder",
                        description="Download data sets from their upstream repositories at "
                                    "pinned commits, verify their sha256 and store them in the "
                                    "data folder (--data, else PALSCTL_DATA, else the user "
                                    "cache folder). Interrupted downloads resume.")
    fe.add_argument("names", nargs="*", metavar="NAME",
                    help="data sets to fetch, or 'all' (default: all); see `palsctl data list`")
    fe.add_argument("--mirror", metavar="URL", default=None,
                    help="fetch from a mirror with raw.githubusercontent.com's layout "
                         "(URL/<owner>/<repo>/<commit>/<path>; default: "
                         "https://raw.githubusercontent.com)")
    fe.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    for p in (ls, fe):
        p.add_argument("--data", metavar="DIR",
                       help="the data folder (default: PALSCTL_DATA, else shared/data beside a "
                            "source checkout, else the user cache folder)")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl data`` with parsed options; return the exit status."""
    if args.data_command == "fetch":
        return _fetch(args)
    return _list(args)


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from palsctl.datasets import DATASETS, missing_files
    from palsctl.paths import data_dir_origin

    folder, origin = data_dir_origin(args.data)
    t = Table(title="public data sets (fetch: palsctl data fetch NAME|all)")
    for col in ("name", "what", "license", "upstream", "download", "here"):
        t.add_column(col, overflow="fold")
    for ds in DATASETS.values():
        missing = missing_files(ds, folder)
        here = "yes" if not missing else ("no" if len(missing) == len(ds.data_files)
                                         else f"{len(missing)} of {len(ds.data_files)} missing")
        t.add_row(ds.name, ds.title, ds.license, f"{ds.repo} @ {ds.commit[:8]}",
                  f"{ds.size_bytes / 1e6:.1f} MB", here)
    Console().print(t)
    print(f"data folder: {folder} ({origin})" if folder is not None else
          "data folder: none yet (`palsctl data fetch` creates the user cache folder)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from palsctl.datasets import DEFAULT_MIRROR, fetch, get_datasets
    from palsctl.paths import ENV_VAR, cache_data_dir, data_dir

    chosen = get_datasets(args.names or ["all"])
    target = Path(args.data or os.environ.get(ENV_VAR) or cache_data_dir()).expanduser()
    mirror = args.mirror or DEFAULT_MIRROR
    if args.quiet:
        results = fetch(chosen, target, mirror=mirror)
    else:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TaskID,
            TextColumn,
            TransferSpeedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn()) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total)
                bar.update(tasks[label], completed=done)

            results = fetch(chosen, target, mirror=mirror, progress=progress)
    for ds in chosen:
        mine = [r for r in results if r.dataset == ds.name]
        got = sum(r.downloaded_bytes for r in mine)
        counts = {s: sum(r.status == s for r in mine) for s in ("downloaded", "resumed", "built")}
        did = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "all present"
        print(f"{ds.name}: {len(mine)} files verified ({did}; {got / 1e6:.1f} MB transferred) "
              f"in {target / ds.name}")
    reads = data_dir()
    if reads is None or reads.resolve() != target.resolve():
        print(f"note: palsctl reads the data folder {reads} first; set {ENV_VAR}={target} "
              "to use these files")
    return 0
