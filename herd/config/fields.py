"""Typed reads of config.json fields, and the errors that name a bad field or flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json herd cannot run: the message names the offending field."""


class ArgumentError(ValueError):
    """A bad option value: the message names the option and what is accepted."""


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in a checkpoint folder's config.json (or in the file `path` itself)."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    return raw


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
