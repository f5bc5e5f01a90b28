"""Desired state: the provider seam and its first providers.

``EmptyProvider`` (the default: nothing declared, nothing mutated), ``StaticProvider`` (tests),
``FileProvider`` (a YAML file, re-read when it changes). A future hub over gRPC is one more
``DesiredProvider``.

A provider says where its state comes from (``source``), because the safety gate trusts a
root-owned file on this node more than anything remote: a remote source gets a per-tick stop
limit. A provider that does not say counts as remote (``Source.HUB``); a file that is not
root-owned, or that group or others may write, counts as remote too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

import desiredfile
from desiredfile import Declared, DesiredFileError
from executor.errors import InvalidInputError
from safety.classify import Source

log = structlog.get_logger("executor.desired")
# Declared moved to desiredfile with the file's parse; re-exported, as every caller imports it from here.
__all__ = ["Declared", "DesiredProvider", "DesiredStateError", "EmptyProvider", "FileProvider", "StaticProvider",
           "check_types", "mistakes", "parse", "provider_source"]


class DesiredProvider(Protocol):
    """Where declared state comes from."""

    def desired(self) -> list[Declared]:
        """The current declared state (raising DesiredStateError when it cannot be had at all)."""


def provider_source(provider: DesiredProvider) -> Source:
    """Where the provider's state comes from: LOCAL_FILE when it says so, else remote (HUB).

    Desired state is never an operator's signed op nor a self-test, whatever a provider claims.
    """
    source = getattr(provider, "source", Source.HUB)
    return Source.LOCAL_FILE if source is Source.LOCAL_FILE else Source.HUB


class DesiredStateError(InvalidInputError, DesiredFileError):
    """The declared state is invalid or unreadable; the message names the file, line and field."""


def mistakes(exc: DesiredStateError, consequence: str) -> list[str]:
    """The lines a command prints for a desired file with mistakes: one per mistake (file:line: ...), then, when
    there are several, how many and ``consequence`` (what did not happen)."""
    problems = str(exc).splitlines()
    if len(problems) > 1:
        return [*problems, f"{len(problems)} mistakes in the desired file; {consequence}"]
    return problems


class EmptyProvider:
    """Nothing declared: the daemon runs and mutates nothing."""

    source = Source.LOCAL_FILE

    def desired(self) -> list[Declared]:
        """Always empty."""
        return []


@dataclass(slots=True)
class StaticProvider:
    """A fixed list, for tests and embedding."""

    guests: list[Declared]
    source: Source = Source.LOCAL_FILE

    def desired(self) -> list[Declared]:
        """The list given."""
        return list(self.guests)


class FileProvider:
    """A YAML file (``guests: [{vmid, state, config, description}]``), re-read when it changes.

    The first read must succeed; on a later bad edit the last good state is kept and a warning
    logged, so a typo never turns into "manage nothing" or a half-applied file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        text, self._stamp, self.source = self._read()
        self._guests = parse(text, str(self.path))

    def _read(self) -> tuple[str, tuple[int, ...], Source]:
        """The file's text, its identity, and the trust its content earns, all from one open descriptor.

        Trust is decided on the descriptor the content is read from (fstat), never on the path later:
        a file swapped in between cannot borrow the root-owned file's trust. The directory counts too:
        whoever may write it may replace the file.
        """
        with self.path.open("rb") as handle:
            st = os.fstat(handle.fileno())
            text = handle.read().decode("utf-8")
        folder = self.path.parent.stat()
        trusted = (st.st_uid == 0 and not st.st_mode & 0o022 and folder.st_uid == 0
                   and not (folder.st_mode & 0o022 and not folder.st_mode & 0o1000))
        return text, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size), (
            Source.LOCAL_FILE if trusted else Source.HUB)

    def _stat(self) -> tuple[int, ...]:
        st = self.path.stat()
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    def desired(self) -> list[Declared]:
        """The file's guests; reloaded when it changed (``source`` is then the new content's trust)."""
        try:
            if self._stat() != self._stamp:
                text, stamp, source = self._read()
                self._guests, self._stamp, self.source = parse(text, str(self.path)), stamp, source
                log.info("desired_reloaded", path=str(self.path), guests=len(self._guests), source=source.value)
        except (OSError, UnicodeDecodeError, DesiredStateError) as exc:
            log.warning("desired_reload_failed", path=str(self.path), error=str(exc), kept=len(self._guests))
        return list(self._guests)


def parse(text: str, name: str = "<desired>") -> list[Declared]:
    """``desiredfile.parse``, its mistakes raised as DesiredStateError (the executor's input error)."""
    try:
        return desiredfile.parse(text, name)
    except DesiredFileError as exc:
        raise DesiredStateError(str(exc)) from exc


def check_types(declared: Iterable[Declared], types: Mapping[int, str]) -> None:
    """``desiredfile.check_types``, its mistakes raised as DesiredStateError."""
    try:
        desiredfile.check_types(declared, types)
    except DesiredFileError as exc:
        raise DesiredStateError(str(exc)) from exc
