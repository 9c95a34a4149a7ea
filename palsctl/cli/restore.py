"""``palsctl restore``: write back the original settings that a ``palsctl control`` which died
(SIGKILL, a crash, a power loss) left changed — GPU power limits, the emulator's limit, the
gateway's or the scheduler plugin's batch limit — from its claim in the state folder
(`palsctl.adapters.state`). Each value is read back to confirm it, with retries and backoff;
a claim is removed only when all of its settings were restored. The claims of running palsctl
processes are left alone. Exit status 0 when everything found was restored (or nothing was
found), 1 when something could not be restored (the claim is kept for a later try).
"""
from __future__ import annotations

import argparse

HELP = "restore the GPU and batch settings a palsctl control that died left behind"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl restore`` to its parser."""
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="the state folder (default: $PALSCTL_STATE_DIR, /run/palsctl for root, "
                        "else ~/.local/state/palsctl)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="the gateway's control token, when the claim names none that can be "
                        "read (else $PALSCTL_GATEWAY_TOKEN)")
    p.add_argument("--list", action="store_true",
                   help="only list the claims found and whether their owners run")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl restore`` with parsed options; return the exit status."""
    from pathlib import Path

    from palsctl.adapters.state import default_state_dir, find_claims, recover

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    claims = find_claims(state_dir)
    if args.list:
        for c in claims:
            state = "running" if c.owner_alive() else "gone"
            print(f"{c.path}: {c.describe()}, {state}: "
                  f"{', '.join(sorted(c.keys))}")
        if not claims:
            print(f"no claims in {state_dir}")
        return 0
    token = None
    if args.token_file:
        from palsctl.adapters.gateway import read_token_file

        token = read_token_file(args.token_file)
    live = [c for c in claims if c.owner_alive()]
    for c in live:
        print(f"left alone: {c.describe()} is running (claim {c.path})")
    recovered = recover(state_dir, token=token)
    status = 0
    for r in recovered:
        for line in r.restored:
            print(f"restored {line} (left by {r.claim.describe()})")
        for line in r.failed:
            print(f"FAILED to restore {line} (left by {r.claim.describe()}); the claim "
                  f"{r.claim.path} is kept")
            status = 1
    if not recovered and not live:
        print(f"nothing to restore (no claims in {state_dir})")
    return status
