"""palsctl exceptions. A user's mistake raises a subclass of `PalsctlError`; the CLI prints its
message on one line and exits with status 2 (no traceback)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ActuatorError", "ConfigError", "HardwareError", "ModelFileError", "PalsctlError",
           "PalsctlWarning", "SensorError", "UnknownNameError"]


class PalsctlError(Exception):
    """Base class of every error palsctl raises on purpose."""


class ConfigError(PalsctlError, ValueError):
    """Invalid configuration: names the file (if any), the key and the offending value.

    ``str()`` has one line per error; ``errors`` holds every error found (one, or several when a
    validator reports them all at once: `collect`).

    Parameters
    ----------
    message : str
        The bare message (what is wrong).
    file : str or None
        The file the value came from.
    key : str or None
        Dotted key of the value (``controller.margin``).
    value : object
        The offending value (shown as ``(got ...)`` when a key is given).
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None,
                 value: Any = None) -> None:
        self.file, self.key, self.value, self.message = file, key, value, message
        self.errors: tuple[ConfigError, ...] = (self,)
        where = []
        if file:
            where.append(str(file))
        if key:
            where.append(f"key '{key}'")
        prefix = ": ".join(where)
        if key is not None and value is not None:
            message = f"{message} (got {value!r})"
        super().__init__(f"{prefix}: {message}" if prefix else message)

    @classmethod
    def collect(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """Make one exception of several errors (flattened).

        Parameters
        ----------
        errors : sequence of ConfigError
            At least one error (each may hold several).

        Returns
        -------
        ConfigError
            The error itself when there is one; otherwise one whose ``str()`` has a line per
            error and whose ``file``/``key``/``value`` are the first error's.
        """
        flat = tuple(e for err in errors for e in err.errors)
        if not flat:
            raise ValueError("ConfigError.collect needs at least one error")
        if len(flat) == 1:
            return flat[0]
        first = flat[0]
        exc = cls(first.message, file=first.file, key=first.key, value=first.value)
        exc.args = ("\n".join(str(e) for e in flat),)
        exc.errors = flat
        return exc


class UnknownNameError(PalsctlError, KeyError):
    """Unknown preset / controller / plant name; the message lists the known names.

    Parameters
    ----------
    kind : str
        What was looked up (``controller``, ``GPU preset``, ...).
    name : str
        The unknown name.
    known : list of str
        The names that exist.
    """

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class HardwareError(PalsctlError, RuntimeError):
    """A hardware / driver problem with an actionable message (no GPU, no permission, ...)."""

    #: the NVML return code when NVML raised it (`palsctl.adapters.nvml`), else None
    nvml_code: int | None = None


class ModelFileError(PalsctlError, ValueError):
    """A power-performance model file is unreadable, of an unknown version or missing a field."""


class PalsctlWarning(UserWarning):
    """Something a user should know that does not stop the run (the CLI prints it on one line:
    ``palsctl COMMAND: warning: ...``)."""


class SensorError(PalsctlError, RuntimeError):
    """A sensor could not produce a reading this time (endpoint down, driver error, a value that
    is not a number). The loop records the step as stale with a fault note and keeps running."""


class ActuatorError(PalsctlError, RuntimeError):
    """An actuator could not apply an action (or confirm it).

    The loop records the step with a fault note and keeps trying on later steps.

    Parameters
    ----------
    message : str
        What failed.
    applied : Action or None
        What is known to be in force after the attempt (knobs left ``None`` are unknown).
    """

    def __init__(self, message: str, *, applied: Any = None) -> None:
        super().__init__(message)
        self.applied = applied
