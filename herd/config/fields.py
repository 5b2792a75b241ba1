"""Typed reads of config.json fields, and the errors that name a bad field or flag."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config.json herd cannot run: the message names the offending field."""


class ArgumentError(ValueError):
    """A bad option value: the message names the option and what is accepted."""


def read_int(
    d: dict[str, Any], key: str, default: int | None = None, *, required: bool = False, where: str = ""
) -> int:
    value = _get(d, key, default, required, where)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where + '.' if where else ''}{key} must be a positive integer, got {value!r}")
    return value


def read_float(
    d: dict[str, Any], key: str, default: float | None = None, *, required: bool = False, where: str = ""
) -> float:
    value = _get(d, key, default, required, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where + '.' if where else ''}{key} must be a number, got {value!r}")
    return float(value)


def _get(d: dict[str, Any], key: str, default: Any, required: bool, where: str) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if required or default is None:
        raise ConfigError(f"config.json is missing {where + '.' if where else ''}{key}")
    return default
