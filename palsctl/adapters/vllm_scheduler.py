r"""Batch actuation inside vLLM: a scheduler class for ``--scheduler-cls`` that reads a target
batch (running-sequence cap) from a small control file.

vLLM has no runtime API for ``max_num_seqs``. Launch the server with the largest batch the
controller may choose and point it at a control file::

    PALSCTL_BATCH_FILE=/run/palsctl/batch \
    vllm serve MODEL --max-num-seqs 256 \
        --scheduler-cls palsctl.adapters.vllm_scheduler.PalsctlAsyncScheduler

(``PalsctlScheduler`` for engines without async scheduling). palsctl writes the target with
`BatchFileActuator`; the file holds one integer. Before each scheduling step the scheduler
re-reads the file when it changed and admits new requests only while fewer than

    effective = min(launch max_num_seqs, max(target, currently running))

are running. The cap never drops below the number already running — running requests are never
preempted by palsctl, the batch drains down as they finish — and never rises above the launch
``max_num_seqs`` (the engine's buffers are sized for it). A missing or unreadable file means
"no target" (the launch value).

The vLLM classes are built on first attribute access, so this module imports without vLLM (the
actuator side needs only the file helpers).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from palsctl.adapters.batch import BatchLimit
from palsctl.adapters.state import atomic_write_text
from palsctl.errors import ActuatorError, ConfigError

log = logging.getLogger(__name__)

ENV_BATCH_FILE = "PALSCTL_BATCH_FILE"


def write_batch_target(path: str | os.PathLike[str], max_batch: int) -> None:
    """Atomically write ``max_batch`` to the control file (a temporary file, fsync, rename)."""
    atomic_write_text(path, f"{int(max_batch)}\n")


def read_batch_target(path: str | os.PathLike[str]) -> int | None:
    """The integer in the control file, or None when missing, empty or not a positive integer."""
    try:
        text = Path(path).read_text().strip()
        value = int(text)
    except (OSError, ValueError):
        return None
    return value if value >= 1 else None


class BatchTargetReader:
    """Re-reads the control file only when it changed (inode, mtime or size)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self.target: int | None = None

    def poll(self) -> int | None:
        """The target in the control file, re-read only when the file changed.

        Returns
        -------
        int or None
            The target batch (sequences); None when no file is set, the file is missing or it
            holds no positive integer.
        """
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self.target = None, None
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            self.target = read_batch_target(self.path)
            log.info("palsctl batch target: %s", self.target)
        return self.target


def effective_cap(target: int | None, running: int, launch_max: int) -> int:
    """The running cap to enforce: the target, never below ``running``, never above
    ``launch_max``; no target means ``launch_max``.

    >>> effective_cap(8, 20, 64), effective_cap(8, 3, 64), effective_cap(500, 3, 64)
    (20, 8, 64)
    """
    if target is None:
        return launch_max
    return int(min(launch_max, max(target, running, 1)))


class BatchFileActuator(BatchLimit):
    """palsctl's side: the scheduler plugin's target batch through the control file, as a
    `palsctl.adapters.batch.BatchLimit` (read back from the file before and after each write,
    drift repaired; a missing file means the launch value).

    ``launch_max``: the server's launch ``max_num_seqs`` (targets are clamped to 1..launch_max).
    `close` writes the target found at open back (``launch_max`` when there was none)."""

    what = "scheduler batch target"

    def __init__(self, path: str | os.PathLike[str], *, launch_max: int, dry_run: bool = False,
                 **kw: Any) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ConfigError("folder of the batch control file does not exist",
                              key="batch_file", value=str(self.path))
        super().__init__(launch_max=launch_max, dry_run=dry_run, **kw)

    def _read_device(self) -> int | None:
        return read_batch_target(self.path)

    def _write_device(self, n: int) -> int:
        write_batch_target(self.path, n)
        got = read_batch_target(self.path)
        return self.launch_max if got is None else got

    def state_target(self) -> dict[str, Any]:
        """The claim entry: the control file's absolute path and the original batch
        (sequences)."""
        return {"kind": "batch_file", "path": str(self.path.resolve()),
                "max_batch": self.original}


def restore_batch_file(path: str | os.PathLike[str], max_batch: int) -> None:
    """Write ``max_batch`` to the control file unless it holds it and read it back (one try).
    Raises `ActuatorError`."""
    try:
        if read_batch_target(path) != max_batch:
            write_batch_target(path, max_batch)
            got = read_batch_target(path)
            if got != max_batch:
                raise ActuatorError(f"{path} holds {got} after writing {max_batch}")
            log.info("scheduler batch target in %s restored to %d", path, max_batch)
    except OSError as exc:
        raise ActuatorError(f"could not restore the batch target in {path}: {exc}") from None


class _BatchCapMixin:
    """Mixed into vLLM's scheduler: applies the control file's target before each step."""

    # set by the vLLM scheduler this is mixed into
    scheduler_config: Any
    running: list[Any]

    def _palsctl_init(self) -> None:
        self._palsctl_launch_max = int(self.scheduler_config.max_num_seqs)
        self._palsctl_reader = BatchTargetReader(os.environ.get(ENV_BATCH_FILE))
        # vLLM >= 0.2x admits into RUNNING up to max_num_active_reqs; older releases use
        # max_num_running_reqs (checked with ==, hence "never below running").
        self._palsctl_attr = ("max_num_active_reqs" if hasattr(self, "max_num_active_reqs")
                              else "max_num_running_reqs")
        self._palsctl_launch_attr = int(getattr(self, self._palsctl_attr))
        if self._palsctl_reader.path is None:
            log.warning("%s is not set: palsctl scheduler runs with the launch max_num_seqs=%d",
                        ENV_BATCH_FILE, self._palsctl_launch_max)

    def _palsctl_apply(self) -> None:
        target = self._palsctl_reader.poll()
        cap = effective_cap(target, len(self.running), self._palsctl_launch_attr)
        setattr(self, self._palsctl_attr, cap)


def _build_classes() -> dict[str, type]:
    try:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError as exc:
        raise ImportError("the palsctl scheduler plugin needs vLLM (pip install 'palsctl[vllm]')"
                          ) from exc

    def make(base: Any, name: str) -> type:  # base: a vLLM scheduler class (untyped)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, *args, **kwargs)
            self._palsctl_init()

        def schedule(self, *args: Any, **kwargs: Any):
            self._palsctl_apply()
            return base.schedule(self, *args, **kwargs)

        cls = type(name, (_BatchCapMixin, base), {"__init__": __init__, "schedule": schedule,
                                                  "__module__": __name__})
        cls.__qualname__ = name
        return cls

    return {"PalsctlScheduler": make(Scheduler, "PalsctlScheduler"),
            "PalsctlAsyncScheduler": make(AsyncScheduler, "PalsctlAsyncScheduler")}


_classes: dict[str, type] | None = None


def __getattr__(name: str) -> Any:
    global _classes
    if name in ("PalsctlScheduler", "PalsctlAsyncScheduler"):
        if _classes is None:
            _classes = _build_classes()
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
