"""The engine of palsctl's one validator: pydantic v2 errors turned into `ConfigError` lines.

Every configuration palsctl reads — the experiment TOML (`palsctl.experiment.schema`), the
``[serving]`` table of ``palsctl control``, the `SafetyGuard`'s and every controller's frozen
Config dataclass — is validated with pydantic v2 and reported through this module: every error
at once, one line each, naming the file, the dotted key and the value; an unknown key comes
with "did you mean" (difflib) and the known keys.

>>> from palsctl.safety import GuardConfig
>>> try:
...     GuardConfig.from_dict({"max_cap_change": 5, "max_batch_change": 0}, file="x.toml")
... except ConfigError as exc:
...     print(exc)
x.toml: key 'guard.max_cap_change': unknown parameter for GuardConfig; did you mean \
'max_cap_change_w'? known: max_batch_change, max_cap_change_w (got 5)
x.toml: key 'guard.max_batch_change': must be >= 1 (got 0)
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from palsctl.errors import ConfigError

__all__ = [
    "CONFIG_FIELDS", "check_config_fields", "config_from_dict", "did_you_mean", "dotted",
    "errors_from", "relocate", "unknown_key", "validate_table",
]

#: pydantic settings of a Config dataclass's fields: exact TOML types (no "1" -> 1, no
#: true -> 1), finite numbers only, any class allowed as a field type (checked by isinstance).
CONFIG_FIELDS = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                           arbitrary_types_allowed=True)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (difflib), else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_key(key: str, value: Any, known: Iterable[str], *, file: str | None,
                what: str = "unknown key") -> ConfigError:
    """The error for an unknown key: ``what``, a "did you mean" and the known keys."""
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    return ConfigError(f"{what}; {did_you_mean(leaf, known)}known: {', '.join(known) or 'none'}",
                       file=file, key=key, value=value)


def dotted(prefix: str, loc: Sequence[str | int]) -> str:
    """A dotted key: ``dotted("setpoint", ("power_budget_w", "steps", 2))`` is
    ``setpoint.power_budget_w.steps[2]``."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


_PLAIN = {
    "missing": "missing required key",
    "int_type": "must be an integer", "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a finite number", "finite_number": "must be a finite number",
    "float_parsing": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a table", "model_type": "must be a table",
    "model_attributes_type": "must be a table", "dataclass_type": "must be a table",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "extra_forbidden": "unknown key",
}


def _message(err: Mapping[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        e = ctx["error"]
        return e.message if isinstance(e, ConfigError) else str(e)
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}
    if kind in bounds:
        return f"must be {bounds[kind]} {_num(next(iter(ctx.values())))}"
    if kind == "string_too_short":
        return "must be a non-empty string"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"needs at least {n} entries"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} entries"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return str(err["msg"])


def errors_from(exc: ValidationError, *, file: str | None, prefix: str = "",
                loc_depth: int | None = None) -> list[ConfigError]:
    """One `ConfigError` per pydantic error: key ``prefix`` + the error's location (the first
    ``loc_depth`` names and any list indices after them), house-style message, the input."""
    out: list[ConfigError] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        if loc_depth is not None:
            loc = loc[:loc_depth] + [p for p in loc[loc_depth:] if isinstance(p, int)]
        key, msg = dotted(prefix, loc), _message(err)
        if (key, msg) in seen:
            continue
        seen.add((key, msg))
        value = None if err["type"] == "missing" else err.get("input")
        out.append(ConfigError(msg, file=file, key=key or None, value=value))
    return out


def validate_table(model: type[BaseModel], raw: Any, *, file: str | None, prefix: str,
                   context: dict[str, Any] | None = None,
                   ) -> tuple[BaseModel | None, list[ConfigError]]:
    """Validate one TOML table against a pydantic model: ``(instance or None, errors)``.
    Unknown keys are reported with "did you mean"; every other error of the table too."""
    if not isinstance(raw, Mapping):
        return None, [ConfigError("must be a table", file=file, key=prefix or None, value=raw)]
    known = model.model_fields
    errors = [unknown_key(dotted(prefix, [k]), v, known, file=file)
              for k, v in raw.items() if k not in known]
    try:
        obj = model.model_validate({k: v for k, v in raw.items() if k in known},
                                   context=context)
    except ValidationError as exc:
        return None, errors + errors_from(exc, file=file, prefix=prefix)
    return (None if errors else obj), errors


# ---- the frozen Config dataclasses (controllers, guard) -------------------------------------
def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(e) for e in x) if isinstance(x, list) else x


def _has_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    return any(_has_tuple(a) for a in typing.get_args(hint))


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):  # a name imported only for type checkers: check it per field
        import sys

        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            ns = vars(sys.modules.get(klass.__module__, None) or typing)
            for name, ann in getattr(klass, "__annotations__", {}).items():
                try:
                    out[name] = eval(ann, dict(ns)) if isinstance(ann, str) else ann
                except Exception:  # noqa: BLE001 - an unresolvable annotation is not checked
                    out[name] = Any
        return out


@functools.cache
def _fields_adapter(cls: type) -> TypeAdapter:
    """A pydantic adapter for a Config dataclass's init fields (each optional: a missing one
    keeps the dataclass default). TOML arrays are lists; a tuple field takes one."""
    hints = _hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints.get(f.name, Any)
        if _has_tuple(hint):
            hint = Annotated[hint, BeforeValidator(_as_tuples)]
        spec[f.name] = NotRequired[hint]
    # mypy checks only TypedDicts written out in the source (misc); pydantic reads the config
    # from an attribute a TypedDict does not declare (attr-defined)
    fields_type = TypedDict(f"{cls.__name__}Fields", spec)  # type: ignore[misc]
    fields_type.__pydantic_config__ = CONFIG_FIELDS  # type: ignore[attr-defined]
    return TypeAdapter(fields_type)


def relocate(exc: ConfigError, *, file: str | None, section: str, own: str) -> ConfigError:
    """The errors of ``exc`` with ``file`` filled in where missing and keys under ``own``
    (the section a Config names itself, e.g. ``controller``) moved under ``section``."""
    moved = []
    for e in exc.errors:
        key = e.key
        if key is not None and section != own and (key == own or key.startswith(own + ".")):
            key = section + key[len(own):]
        moved.append(ConfigError(e.message, file=e.file or file, key=key, value=e.value))
    return ConfigError.collect(moved)


def config_from_dict(cls: type, params: Any, *, file: str | None, section: str) -> Any:
    """Build the frozen Config dataclass ``cls`` from a dict: unknown keys, field types and
    the ``Annotated`` constraints are checked by pydantic (every error at once), then the
    class's ``__post_init__`` runs its cross-field checks."""
    if not isinstance(params, Mapping):
        raise ConfigError("must be a table", file=file, key=section, value=params)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    errors = [unknown_key(f"{section}.{k}", v, names, file=file,
                          what=f"unknown parameter for {cls.__qualname__}")
              for k, v in params.items() if k not in names]
    values: dict[str, Any] = {}
    try:
        values = _fields_adapter(cls).validate_python(
            {k: v for k, v in params.items() if k in names})
    except ValidationError as exc:
        errors += errors_from(exc, file=file, prefix=section, loc_depth=1)
    if errors:
        raise ConfigError.collect(errors)
    own = getattr(cls, "section", "controller")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise relocate(exc, file=file, section=section, own=own) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), file=file, key=section) from None


def check_config_fields(config: Any) -> None:
    """Check a constructed Config's fields against their types and ``Annotated`` constraints
    (what `config_from_dict` checks before construction); raise every error at once."""
    cls: type = type(config)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.init}
    try:
        _fields_adapter(cls).validate_python(values)
    except ValidationError as exc:
        raise ConfigError.collect(errors_from(exc, file=None, prefix=getattr(
            cls, "section", "controller"), loc_depth=1)) from None
