"""Typed access to parsed TOML data, failing with the key path of what is wrong.

This module owns `ConfigError` (the one error bad configuration raises), how a key
path is written in messages (`key_path`: `tables."public.notes".title`,
`worker.mapper_modules[0]`), the "did you mean" suggestion for unknown keys, and
`TomlReader`, whose methods read one key of one type and range. What each section
of the worker's file may contain is `config`'s business, not this module's.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NoReturn

from slipstream.index.doc import IDENTIFIER
from slipstream.index.errors import ConfigurationError

__all__ = ["MISSING", "ConfigError", "TomlReader", "did_you_mean", "key_path", "type_name"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(ConfigurationError):
    """The configuration is wrong. `path` is the key path ('' for the whole file)."""

    def __init__(self, problem: str, *, path: str = "", source: str = "<string>") -> None:
        self.problem, self.path, self.source = problem, path, source
        super().__init__(f"{source}: {path}: {problem}" if path else f"{source}: {problem}")


def key_path(*parts: str | int) -> str:
    """A TOML key path as written in a file: tables."public.notes".filter, modules[0]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            shown = part if _BARE_KEY.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{shown}" if out else shown
    return out


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "an array", dict: "a table"}
MISSING: Any = object()


def type_name(value: object) -> str:
    for t, name in _TYPE_NAMES.items():
        if type(value) is t:
            return name
    return type(value).__name__


def did_you_mean(word: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class TomlReader:
    """Typed access to TOML data that fails with the key path of what is wrong."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: Sequence[str | int], problem: str) -> NoReturn:
        raise ConfigError(problem, path=key_path(*path), source=self.source)

    def section(self, value: object, path: tuple[str | int, ...],
                known: Sequence[str] | None) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a table ([{key_path(*path)}]), got {type_name(value)}")
        if known is not None:
            for key in value:
                if key not in known:
                    hint = did_you_mean(key, known) or f"; the known keys are {', '.join(known)}"
                    self.fail((*path, key), f"unknown key{hint}")
        return dict(value)

    def get(self, sec: Mapping[str, Any], path: tuple[str | int, ...], default: Any,
            kinds: tuple[type, ...], what: str) -> Any:
        value = sec.get(str(path[-1]), MISSING)
        if value is MISSING:
            if default is MISSING:
                self.fail(path, f"missing; set it to {what}")
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.fail(path, f"must be {what}, got {type_name(value)} {value!r}")
        return value

    def string(self, sec: Mapping[str, Any], path: tuple[str | int, ...],
               default: Any = MISSING, what: str = "a string") -> Any:
        value = self.get(sec, path, default, (str,), what)
        if isinstance(value, str) and not value.strip():
            self.fail(path, f"is empty; set it to {what}")
        return value

    def integer(self, sec: Mapping[str, Any], path: tuple[str | int, ...], default: Any,
                minimum: int, maximum: int | None = None) -> int:
        what = f"an integer ≥ {minimum}" + (f" and ≤ {maximum}" if maximum is not None else "")
        value = self.get(sec, path, MISSING if default is None else default, (int,), what)
        if value < minimum or (maximum is not None and value > maximum):
            self.fail(path, f"is {value}; it must be {what}")
        return value

    def number(self, sec: Mapping[str, Any], path: tuple[str | int, ...], default: float,
               positive: bool = False) -> float:
        what = "a number > 0" if positive else "a number ≥ 0 (0 turns it off)"
        value = float(self.get(sec, path, default, (int, float), what))
        if not (value > 0 if positive else value >= 0) or value == float("inf"):
            self.fail(path, f"is {value}; it must be {what}")
        return value

    def check_name(self, name: str, path: tuple[str | int, ...], what: str,
                   pattern: re.Pattern[str], rule: str = "") -> str:
        if not pattern.fullmatch(name):
            rule = rule or ("letters, digits and underscores, starting with a letter or "
                            "underscore, at most 63 characters")
            self.fail(path, f"{name!r} is not {what}: use {rule}")
        return name

    def name(self, sec: Mapping[str, Any], path: tuple[str | int, ...], default: str,
             pattern: re.Pattern[str], rule: str) -> str:
        value = self.string(sec, path, default)
        return self.check_name(value, path, f"a valid {path[-1]} name", pattern, rule)

    def identifier(self, sec: Mapping[str, Any], path: tuple[str | int, ...],
                   default: Any = MISSING) -> str:
        value = self.string(sec, path, default, "an identifier")
        return self.check_name(value, path, "a plain identifier", IDENTIFIER)

    def str_list(self, sec: Mapping[str, Any], path: tuple[str | int, ...],
                 default: Any, what: str = "an array of strings") -> Any:
        value = self.get(sec, path, default, (list, tuple), what)
        if value is None:
            return None
        seen: set[str] = set()
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail((*path, i), f"must be a non-empty string, got {type_name(item)} {item!r}")
            if item in seen:
                self.fail((*path, i), f"{item!r} is listed twice; list it once")
            seen.add(item)
        return tuple(value)

    def env_name(self, sec: Mapping[str, Any], path: tuple[str | int, ...]) -> str | None:
        value = self.string(sec, path, None, "the name of an environment variable")
        if value is not None:
            self.check_name(value, path, "an environment variable name", _ENV_NAME,
                            "letters, digits and underscores")
        return value
