"""The batch knob (vLLM's running-sequence limit) as an `Actuator` that reads back.

vLLM has no runtime API for ``max_num_seqs``; palsctl sets a limit through the admission
gateway (`GatewayBatch`, over `palsctl.adapters.gateway.GatewayControl`) or the scheduler
plugin's control file (`palsctl.adapters.vllm_scheduler.BatchFileActuator`). Both are a
`BatchLimit`: every ``apply`` reads the limit in force first — the write is skipped only when
the endpoint already holds the value — and reads it back after writing; a value other than the
last one palsctl set (a restarted gateway, an edited file) is a drift, repaired, logged once per
episode and counted in ``drift.events``. ``close`` restores the limit found at open with retries
and backoff, and raises `ActuatorError` when it cannot (never a silent success).
"""
from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from palsctl.adapters.state import DriftWatch, retry
from palsctl.errors import ActuatorError, ConfigError, PalsctlError
from palsctl.types import Action

__all__ = ["BatchLimit", "GatewayBatch", "restore_gateway"]

log = logging.getLogger(__name__)


class BatchLimit:
    """A running-sequence limit with read-back, drift repair and restore (module doc).

    Subclasses implement ``_read_device() -> int | None`` (the limit in force; None: no limit
    set, which means ``launch_max``), ``_write_device(n) -> int`` (write, return the value read
    back) and ``state_target() -> dict``, and set what they
    need before calling ``super().__init__``, which reads the original limit.

    Parameters
    ----------
    launch_max : int
        The server's launch ``max_num_seqs``: limits are clamped to ``1..launch_max``.
    dry_run : bool
        Compute and log, write nothing (``apply`` reports the would-be value).
    restore_attempts, restore_backoff_s : int, float
        Tries and first pause (seconds, doubling) of a restore.
    """

    what: ClassVar[str] = "batch limit"

    def __init__(self, *, launch_max: int, dry_run: bool = False, restore_attempts: int = 5,
                 restore_backoff_s: float = 0.2) -> None:
        if isinstance(launch_max, bool) or not isinstance(launch_max, int) or launch_max < 1:
            raise ConfigError("launch max_num_seqs must be an integer >= 1",
                              key="max_batch_launch", value=launch_max)
        self.launch_max = launch_max
        self.dry_run = dry_run
        self.restore_attempts, self.restore_backoff_s = restore_attempts, restore_backoff_s
        self.drift = DriftWatch(self.what)
        found = self._read_device()
        self.original = self.launch_max if found is None else found
        #: the limit in force as last read back (in a dry run: the would-be value)
        self.max_batch = self.original
        self._commanded: int | None = None

    # -- provided by subclasses
    def _read_device(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_device(self, n: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_target(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The claim entry (`palsctl.adapters.state`) that restores the limit found at open.

        Returns
        -------
        dict
            ``kind``, where the limit lives and the original limit (sequences).
        """
        raise NotImplementedError

    # -- the knob
    def clamp(self, max_batch: int) -> int:
        """``max_batch`` clamped to ``1..launch_max``."""
        return int(min(max(int(max_batch), 1), self.launch_max))

    def read_max_batch(self) -> int:
        """The limit in force, read from the endpoint (in a dry run: the would-be value)."""
        if self.dry_run and self._commanded is not None:
            return self._commanded
        found = self._read_device()
        self.max_batch = self.launch_max if found is None else found
        return self.max_batch

    def set_max_batch(self, max_batch: int) -> int:
        """Set the limit (clamped) and return the value in force afterwards, read back."""
        value = self.clamp(max_batch)
        if self.dry_run:
            if value != self.max_batch:
                log.info("dry run: would set %s %d -> %d", self.what, self.max_batch, value)
            self._commanded = self.max_batch = value
            return value
        device = self._read_device()
        self.drift.check(None, device, self._commanded)
        if device != value:
            device = self._write_device(value)
        self._commanded, self.max_batch = value, device
        return device

    def apply(self, action: Action) -> Action:
        """The `Actuator`: set ``action.max_batch`` (None: read back only); returns the limit
        in force. Endpoint failures raise `ActuatorError`."""
        try:
            if action.max_batch is None:
                return Action(max_batch=self.read_max_batch())
            return Action(max_batch=self.set_max_batch(action.max_batch))
        except (PalsctlError, OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, ActuatorError):
                raise
            raise ActuatorError(f"{self.what}: {exc}") from None

    # -- restore
    def _restore_once(self) -> None:
        if self._read_device() != self.original:
            got = self._write_device(self.original)
            if got != self.original:
                raise ActuatorError(f"{self.what} is {got} after writing {self.original}")
            log.info("%s restored to %d", self.what, self.original)
        self._commanded, self.max_batch = None, self.original

    def restore(self) -> None:
        """Write the limit found at open back (confirmed by reading it back; retries with
        backoff). Raises `ActuatorError` when it cannot. A dry run writes nothing."""
        if self.dry_run:
            return
        try:
            retry(self._restore_once, attempts=self.restore_attempts,
                  first_delay_s=self.restore_backoff_s, what=f"restoring the {self.what}")
        except Exception as exc:  # noqa: BLE001 - reported as what it is
            raise ActuatorError(f"could not restore the {self.what} to {self.original}: "
                                f"{exc}") from None

    def close(self) -> None:
        """Restore the limit found at open (see `restore`)."""
        self.restore()


class GatewayBatch(BatchLimit):
    """The gateway's concurrency limit (``GatewayControl``) as a `BatchLimit`.

    ``token_file``: the control token's file, recorded in the claim (never the token) so that
    ``palsctl restore`` can reach the gateway after a crash."""

    what = "gateway max_concurrency"

    def __init__(self, control: Any, *, launch_max: int, dry_run: bool = False,
                 token_file: str | None = None, **kw: Any) -> None:
        self.control = control
        self.token_file = token_file
        super().__init__(launch_max=launch_max, dry_run=dry_run, **kw)

    def _read_device(self) -> int:
        return int(self.control.state()["max_concurrency"])

    def _write_device(self, n: int) -> int:
        return int(self.control.set_max_concurrency(n))

    def state_target(self) -> dict[str, Any]:
        """The claim entry: the gateway's control URL, its token file and the original
        ``max_concurrency`` (sequences)."""
        return {"kind": "gateway", "url": self.control.control_url,
                "token_file": self.token_file, "max_concurrency": self.original}


def restore_gateway(url: str, max_concurrency: int, *, token_file: str | None = None,
                    token: str | None = None) -> None:
    """Write a gateway's limit back unless it holds it already and read it back (one try).
    The token comes from ``token_file``, else ``token``, else ``$PALSCTL_GATEWAY_TOKEN``.
    Raises `ActuatorError`."""
    from palsctl.adapters.gateway import GatewayControl, read_token_file

    try:
        if token_file:
            token = read_token_file(token_file)
        token = token or os.environ.get("PALSCTL_GATEWAY_TOKEN", "")
        if not token:
            raise ActuatorError("no control token (give --token-file or set "
                                "$PALSCTL_GATEWAY_TOKEN)")
        ctl = GatewayControl(url, token)
        if int(ctl.state()["max_concurrency"]) != max_concurrency:
            got = ctl.set_max_concurrency(max_concurrency)
            if got != max_concurrency:
                raise ActuatorError(f"the gateway holds {got} after writing {max_concurrency}")
            log.info("gateway max_concurrency restored to %d", max_concurrency)
    except ActuatorError:
        raise
    except (PalsctlError, OSError, ValueError, KeyError) as exc:
        raise ActuatorError(f"could not restore the gateway limit at {url}: {exc}") from None
