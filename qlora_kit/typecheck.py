"""A YAML value checked against a Python type annotation: the one rule every recipe key goes through.

`coerce(value, tp, where)` returns the value when it fits `tp` (Literal choices, unions, lists, dicts, bool, int,
float, str, None; an int is accepted where a float is expected, and PyYAML's `1e-3`-as-a-string is read as the number
it means) and raises ConfigError naming `where` and what was expected otherwise. Torch-free, like config.py.
"""

from __future__ import annotations

import math
import reprlib
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 3, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40
SHOWN_CHARS = 80  # a value echoed in a message: a 40 MB list would make a 40 MB error line


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A short repr of `value` for a message: reprlib walks only the first items of the first levels, then the text
    is cut to `limit` characters (a wrong-typed 40 MB list must not make a 40 MB error line)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted where floats are expected)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in YAML): tokenizers reject it mid-run
            raise ConfigError(f"{where}: {shown(value, 60)} holds an invalid unicode character (a lone surrogate); "
                              "fix the escape sequence.") from None
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {shown(value)} is not allowed; choose one of {type_name(tp)}.")
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return coerce(value, arm, where)
            except ConfigError:
                errors.append(type_name(arm))
        raise ConfigError(f"{where}: expected {' or '.join(errors)}, got {type(value).__name__} {shown(value)}.")
    if origin is dict:
        key_tp, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping like {{key: value}}, got {type(value).__name__} "
                              f"{shown(value)}.")
        return {coerce(k, key_tp, f"{where} key"): coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {shown(value)}.")
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {shown(value)}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 else math.inf  # a 400-digit int overflows float()
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string; users mean the number
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan / .inf pass `> 0` range checks and poison training later
                raise ConfigError(f"{where}: expected a finite number, got {shown(value)}.")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this function does not know is a bug here, not user input
        raise AssertionError(f"unhandled annotation {tp!r}")
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {shown(value)}.")
