"""What palsctl changed on a device, kept where a later process finds it, and the small tools
for changing settings safely: atomic writes, retries with backoff, drift detection.

**Claims.** Before its first write to a device, ``palsctl control`` writes a *claim*: a JSON
file in the state folder holding the original settings of every target it will change (the
power limit of each GPU, the emulator's limit, the gateway's or the scheduler plugin's batch
limit) and its owner (host, PID and the PID's start time, so a reused PID is not mistaken for
the owner). The file is written atomically (temporary file, ``fsync``, rename) and removed only
after every original was restored. A process killed with SIGKILL leaves its claim behind; the
next start — or ``palsctl restore`` — finds the claim of a dead owner, writes the originals back
(with retries and backoff, reading each value back to confirm) and removes the claim only if
that worked. A claim of a *live* owner on the same targets stops a second ``palsctl control``
from fighting over the same knobs.

Target entries (``kind`` and what identifies it, plus the original value):

=============  ==============================================  =====================
kind           identifies the target                           original
=============  ==============================================  =====================
``nvml``       ``index`` (NVML index on this host)             ``power_limit_w``
``emulator``   ``url`` (the emulator's base URL)               ``power_limit_w``
``gateway``    ``url`` (control URL), ``token_file`` or None   ``max_concurrency``
``batch_file`` ``path`` (the scheduler plugin's control file)  ``max_batch``
=============  ==============================================  =====================

The state folder is ``$PALSCTL_STATE_DIR``, else ``/run/palsctl`` for root (cleared at reboot,
like the GPUs' limits), else ``$XDG_STATE_HOME/palsctl`` (default ``~/.local/state/palsctl``).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from palsctl.errors import PalsctlError

__all__ = ["Claim", "ClaimConflict", "DriftWatch", "Recovery", "atomic_write_text",
           "default_state_dir", "find_claims", "fsync_dir", "recover", "restore_targets", "retry",
           "target_key"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
T = TypeVar("T")


# ------------------------------------------------------------------------- durable writes
def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, whole:
    write a temporary file in the same folder, ``fsync`` it, rename it over ``path`` and
    ``fsync`` the folder. ``mode``: the file's permission bits."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a folder so that a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def retry(fn: Callable[[], T], *, attempts: int = 5, first_delay_s: float = 0.2,
          max_delay_s: float = 2.0, sleep: Callable[[float], None] = time.sleep,
          what: str = "") -> T:
    """Call ``fn`` until it returns, at most ``attempts`` times, sleeping ``first_delay_s``,
    then twice as long each time (at most ``max_delay_s``) between tries. Raises the last
    error (any `Exception`) when every attempt failed; each failure but the last is logged."""
    delay = first_delay_s
    for k in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # retried, then re-raised
            if k == attempts:
                raise
            log.warning("%s failed (attempt %d of %d: %s); retrying in %.1f s",
                        what or getattr(fn, "__name__", "call"), k, attempts, exc, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


class DriftWatch:
    """Notices a device value that differs from what palsctl last commanded (changed by
    another tool, a driver reset, a restarted gateway). Each episode — from the first read-back
    that differs to the next that agrees — is logged once (WARNING) and counted in ``events``.

    Parameters
    ----------
    what : str
        What is watched, for the log line (``"GPU power limit"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.events = 0
        self._drifting: set[Any] = set()

    def check(self, key: Any, device: Any, commanded: Any) -> bool:
        """True when ``device`` (read back) differs from ``commanded`` (None: nothing
        commanded yet, never a drift); logs and counts the start of an episode."""
        if commanded is None or device == commanded:
            self._drifting.discard(key)
            return False
        if key not in self._drifting:
            self._drifting.add(key)
            self.events += 1
            log.warning("%s%s: the device holds %s, not the %s palsctl set; re-applying "
                        "(logged once per episode)", self.what,
                        "" if key is None else f" {key}", _num(device), _num(commanded))
        return True


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# ------------------------------------------------------------------------- claims
class ClaimConflict(PalsctlError):
    """Another live palsctl process holds a claim on the same targets."""


def default_state_dir() -> Path:
    """The state folder (module doc)."""
    env = os.environ.get("PALSCTL_STATE_DIR")
    if env:
        return Path(env)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/run/palsctl")
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "palsctl"


def target_key(entry: dict[str, Any]) -> str:
    """``kind:identity`` of a target entry (``nvml:0``, ``gateway:http://...``)."""
    kind = entry.get("kind")
    ident = {"nvml": "index", "emulator": "url", "gateway": "url",
             "batch_file": "path"}.get(kind) if isinstance(kind, str) else None
    if ident is None:
        raise ValueError(f"unknown target kind {kind!r}")
    return f"{kind}:{entry[ident]}"


def _keys_overlap(a: Iterable[str], b: Iterable[str]) -> bool:
    """Whether two key sets share a target (``nvml:*`` stands for every GPU of the host)."""
    a, b = set(a), set(b)
    if a & b:
        return True
    wild = {k.split(":", 1)[0] for k in a | b if k.endswith(":*")}
    return any(k.split(":", 1)[0] in wild for k in a) and any(k.split(":", 1)[0] in wild
                                                                 for k in b)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def _own_start_ticks() -> int | None:
    st = _proc_stat(os.getpid())
    return None if st is None else st[1]


@dataclass
class Claim:
    """A claim file: ``path``, owner (``host``, ``pid``, ``start_ticks``), ``created`` (UNIX
    seconds), ``command`` and ``targets`` (entries, module doc)."""

    path: Path
    host: str
    pid: int
    start_ticks: int | None
    created: float
    command: str
    targets: list[dict[str, Any]] = field(default_factory=list)

    @property
    def keys(self) -> set[str]:
        """The target keys (`target_key`) this claim holds, such as ``nvml:0``."""
        return {target_key(t) for t in self.targets}

    def owner_alive(self) -> bool:
        """Whether the owning process still runs (a zombie, a PID reused by another process
        or a previous incarnation of this PID count as dead)."""
        if self.pid == os.getpid():
            return self.start_ticks is None or self.start_ticks == _own_start_ticks()
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        st = _proc_stat(self.pid)
        if st is None:
            return True          # no /proc: the PID exists, assume it is the owner
        state, ticks = st
        if state in ("Z", "X"):
            return False
        return self.start_ticks is None or ticks == self.start_ticks

    @classmethod
    def write(cls, state_dir: str | os.PathLike[str], targets: Sequence[dict[str, Any]], *,
              command: str = "") -> "Claim":
        """Write this process's claim on ``targets`` (atomic, mode 0600, folder 0700)."""
        d = Path(state_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        ticks = _own_start_ticks()
        claim = cls(path=d / f"claim-{os.getpid()}-{ticks or 0}.json",
                    host=socket.gethostname(), pid=os.getpid(), start_ticks=ticks,
                    created=time.time(), command=command, targets=[dict(t) for t in targets])
        claim.save()
        return claim

    def save(self) -> None:
        """(Re)write the claim file atomically."""
        body = {"version": STATE_VERSION, "host": self.host, "pid": self.pid,
                "start_ticks": self.start_ticks, "created": self.created,
                "command": self.command, "targets": self.targets}
        atomic_write_text(self.path, json.dumps(body, indent=2) + "\n", mode=0o600)

    def release(self) -> None:
        """Remove the claim file (after every original was restored)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(self.path.parent)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Claim":
        """Read a claim file; `ValueError` when it is not one."""
        p = Path(path)
        body = json.loads(p.read_text())
        if not isinstance(body, dict) or body.get("version") != STATE_VERSION:
            raise ValueError("not a palsctl claim (version)")
        targets = body.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
            raise ValueError("targets must be a list of objects")
        for t in targets:
            target_key(t)
        return cls(path=p, host=str(body["host"]), pid=int(body["pid"]),
                   start_ticks=body.get("start_ticks"), created=float(body.get("created", 0)),
                   command=str(body.get("command", "")), targets=targets)

    def describe(self) -> str:
        """The owner in words for a message: PID, command and the local time of the claim."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        return f"pid {self.pid} ({self.command or 'palsctl'}, since {when})"


def find_claims(state_dir: str | os.PathLike[str]) -> list[Claim]:
    """The claims of this host in ``state_dir`` (unreadable files are logged and skipped)."""
    d = Path(state_dir)
    if not d.is_dir():
        return []
    host = socket.gethostname()
    out = []
    for p in sorted(d.glob("claim-*.json")):
        try:
            c = Claim.load(p)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read the claim file %s (%s); leaving it alone", p, exc)
            continue
        if c.host == host:
            out.append(c)
    return out


# ------------------------------------------------------------------------- restoring
def _describe_target(t: dict[str, Any]) -> str:
    kind = t["kind"]
    if kind == "nvml":
        return f"GPU {t['index']} power limit {t['power_limit_w']:g} W"
    if kind == "emulator":
        return f"emulated power limit at {t['url']} {t['power_limit_w']:g} W"
    if kind == "gateway":
        return f"gateway limit at {t['url']} {t['max_concurrency']}"
    return f"batch target in {t['path']} {t['max_batch']}"


def restore_targets(targets: Sequence[dict[str, Any]], *, token: str | None = None,
                    attempts: int = 5, first_delay_s: float = 0.2,
                    sleep: Callable[[float], None] = time.sleep,
                    nvml_backend: Any = None) -> tuple[list[str], list[str]]:
    """Write the original value of every target back, each confirmed by reading it back, with
    `retry`. Returns ``(restored, failed)``: one line per target. ``token``: the gateway's
    control token when the entry names no readable ``token_file`` (else
    ``$PALSCTL_GATEWAY_TOKEN``); ``nvml_backend``: a ``pynvml``-shaped object (tests)."""
    restored: list[str] = []
    failed: list[str] = []
    nvml = [t for t in targets if t["kind"] == "nvml"]
    others = [t for t in targets if t["kind"] != "nvml"]

    def run(what: str, fn: Callable[[], None]) -> None:
        try:
            retry(fn, attempts=attempts, first_delay_s=first_delay_s, sleep=sleep,
                  what=f"restoring the {what}")
            restored.append(what)
        except Exception as exc:  # noqa: BLE001 - reported truthfully, never raised
            failed.append(f"{what}: {exc}")

    if nvml:
        from palsctl.adapters.nvml import restore_limits  # needs the driver
        what = ", ".join(_describe_target(t) for t in nvml)
        run(what, lambda: restore_limits({int(t["index"]): float(t["power_limit_w"])
                                          for t in nvml}, backend=nvml_backend))
    for t in others:
        run(_describe_target(t), functools.partial(_restore_one, t, token))
    return restored, failed


def _restore_one(t: dict[str, Any], token: str | None) -> None:
    kind = t["kind"]
    if kind == "emulator":
        from palsctl.adapters.emulator import restore_limit
        restore_limit(t["url"], float(t["power_limit_w"]))
    elif kind == "gateway":
        from palsctl.adapters.batch import restore_gateway
        restore_gateway(t["url"], int(t["max_concurrency"]), token_file=t.get("token_file"),
                        token=token)
    else:
        from palsctl.adapters.vllm_scheduler import restore_batch_file
        restore_batch_file(t["path"], int(t["max_batch"]))


@dataclass(frozen=True)
class Recovery:
    """What `recover` did with one dead owner's claim."""

    claim: Claim
    restored: list[str]
    failed: list[str]

    @property
    def ok(self) -> bool:
        """Whether every target of the claim was restored (none failed)."""
        return not self.failed


def recover(state_dir: str | os.PathLike[str], keys: Iterable[str] | None = None, *,
            token: str | None = None, restore: bool = True, **restore_kw: Any
            ) -> list[Recovery]:
    """Handle the claims in ``state_dir`` that touch ``keys`` (all claims when None).

    A claim of a live owner raises `ClaimConflict` when ``keys`` is given (someone else controls
    these targets). A dead owner's claim has its originals restored (``restore=False``: only
    reported) and is removed when every target was restored; the returned `Recovery` list
    says what happened."""
    keys = None if keys is None else set(keys)
    out: list[Recovery] = []
    for c in find_claims(state_dir):
        if keys is not None and not _keys_overlap(c.keys, keys):
            continue
        if c.owner_alive():
            if keys is None:
                continue
            raise ClaimConflict(f"another palsctl, {c.describe()}, controls "
                                f"{', '.join(sorted(c.keys & keys) or sorted(c.keys))} "
                                f"(claim {c.path}); stop it first")
        if not restore:
            out.append(Recovery(claim=c, restored=[], failed=[]))
            continue
        restored, failed = restore_targets(c.targets, token=token, **restore_kw)
        if not failed:
            c.release()
        out.append(Recovery(claim=c, restored=restored, failed=failed))
    return out
