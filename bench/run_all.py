"""Run every benchmark in this folder, one after the other (`make bench`).

Each script prints its own medians and the machine it ran on; copy the figures you want to keep
into bench/RESULTS.md. Pass script names to run a subset: `python bench/run_all.py plant loop`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_plant.py", "bench_loop.py", "bench_models.py", "bench_controllers.py",
           "bench_analysis.py", "bench_gateway.py"]


def main(argv: list[str]) -> int:
    chosen = [s for s in SCRIPTS if not argv or any(a in s for a in argv)]
    if not chosen:
        print(f"no benchmark matches {argv}; known: {', '.join(SCRIPTS)}", file=sys.stderr)
        return 2
    failed = []
    for i, script in enumerate(chosen, 1):
        print(f"\n=== [{i}/{len(chosen)}] {script}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script)])
        print(f"=== {script}: exit {rc} after {time.perf_counter() - t0:.1f} s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
