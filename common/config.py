"""Layered configuration: defaults, then a TOML file, then environment variables, then flags.

Each service declares its ``Option``s once; this module builds the flags, reads the file and the
environment, checks every value, and renders the effective configuration with secrets redacted.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off", ""})


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One setting: ``key`` is its TOML key, ``--key-with-dashes`` its flag, ``PREFIX_KEY`` its variable."""

    key: str
    kind: type = str
    default: Any = None
    help: str = ""
    secret: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.key.replace("_", "-")


class ConfigError(ValueError):
    """A setting is invalid; the message names the key, the reason and where the value came from."""

    def __init__(self, key: str, reason: str, source: str = "") -> None:
        super().__init__(f"config: {key}: {reason}" + (f" (from {source})" if source else ""))
        self.key, self.reason, self.source = key, reason, source


@dataclass(frozen=True, slots=True)
class Config:
    """The effective settings and where each came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    options: Sequence[Option]

    def namespace(self) -> argparse.Namespace:
        """The values as attributes."""
        return argparse.Namespace(**self.values)

    def render(self) -> str:
        """TOML of the effective settings, secrets redacted, each with its source as a comment."""
        lines = []
        for option in self.options:
            value = self.values[option.key]
            if value is None:
                lines.append(f"# {option.key} is not set")
                continue
            shown = REDACTED if option.secret else value
            literal = ("true" if shown else "false") if isinstance(shown, bool) else (
                str(shown) if isinstance(shown, int | float) else '"' + str(shown).replace('"', '\\"') + '"')
            lines.append(f"{option.key} = {literal}  # {self.sources[option.key]}")
        return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser, options: Sequence[Option], env_prefix: str) -> None:
    """A flag for each option (absent unless given, so the layers below show through)."""
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help=f"TOML file of settings [{env_prefix}CONFIG]")
    parser.add_argument("--print-config", action="store_true", help="print the effective settings and exit")
    for option in options:
        env = f"{env_prefix}{option.key.upper()}"
        help_text = f"{option.help} [{env}]" + ("" if option.default is None else f" (default {option.default})")
        if option.kind is bool:
            parser.add_argument(option.flag, dest=option.key, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(option.flag, dest=option.key, default=argparse.SUPPRESS, help=help_text,
                                choices=option.choices)


def resolve(options: Sequence[Option], args: argparse.Namespace, env_prefix: str,
            environ: Mapping[str, str] | None = None, *, others: Collection[str] = ()) -> Config:
    """Defaults < TOML file < environment < flags; ConfigError names the first bad setting.

    ``others``: settings of the program's other commands; one file serves them all, so this command
    leaves them alone there (``plan`` reads the daemon's file and skips ``max_parallel``).
    """
    environ = os.environ if environ is None else environ
    by_key = {o.key: o for o in options}
    values = {o.key: o.default for o in options}
    sources = {o.key: "default" for o in options}
    path = getattr(args, "config", None) or environ.get(env_prefix + "CONFIG")
    if path:
        for key, raw in _read_toml(path).items():
            if key not in by_key:
                if key in others:
                    continue
                raise ConfigError(key, "unknown setting", path)
            values[key], sources[key] = _check(by_key[key], raw, path), path
    for option in options:
        env = env_prefix + option.key.upper()
        if env in environ:
            values[option.key], sources[option.key] = _check(option, environ[env], env), env
        if option.key in vars(args):
            values[option.key], sources[option.key] = _check(option, vars(args)[option.key], option.flag), option.flag
    return Config(values, sources, options)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc


def _check(option: Option, raw: Any, source: str) -> Any:
    """``raw`` (text from the environment or a flag, or a TOML value) as the option's type."""
    try:
        value = _convert(option.kind, raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(option.key, f"must be {option.kind.__name__}, got {'<redacted>' if option.secret else raw!r}",
                          source) from exc
    if option.choices is not None and value not in option.choices:
        raise ConfigError(option.key, f"must be one of {', '.join(option.choices)}, got {value!r}", source)
    if option.minimum is not None and value is not None and value < option.minimum:
        raise ConfigError(option.key, f"must be at least {option.minimum}, got {value}", source)
    if option.maximum is not None and value is not None and value > option.maximum:
        raise ConfigError(option.key, f"must be at most {option.maximum}, got {value}", source)
    return value


def _convert(kind: type, raw: Any) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in TRUE | FALSE:
            return text in TRUE
        raise ValueError(raw)
    if kind in (int, float):
        if isinstance(raw, bool):
            raise TypeError(raw)
        return kind(raw)
    if not isinstance(raw, str):
        raise TypeError(raw)
    return raw
