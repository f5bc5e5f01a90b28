"""What remote sources stopped, kept on the node: state_dir/remote-stops.json (0600, fsync'd).

The blast radius (``safety.blast``) counts what the node has: a guest a remote source stopped
stays counted, as managed and stopped, after the source stops declaring it or drops its run
state, until it runs again or is gone; and the source's stops in the current window use up its
rate. Both survive a restart because both are here. The gate writes before a remote stop is
admitted (a stop it cannot record does not run) and when a stop ends or the node's read moves an
entry; a tick with nothing new writes nothing. An unreadable record is rebuilt on the safe side
at the next read of the node: every guest stopped then counts as a remote stop made now.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Any

import structlog

from executor.gate.files import write_private
from safety.blast import RemoteStop, settle

log = structlog.get_logger("executor.stopledger")
NAME = "remote-stops.json"
VERSION = 1


class StopLedger:
    """The remote stops that count, and when the remote stops of the current window were admitted.

    ``path`` None keeps them in memory only (a test's gate); ``writable`` False never writes (the dry run).
    """

    def __init__(self, path: Path | None = None, *, writable: bool = True) -> None:
        self._path, self._writable = path, writable and path is not None
        self._lock = threading.Lock()
        self._stops: dict[int, RemoteStop] = {}
        self._window: list[float] = []
        self._lost = False  # unreadable: rebuilt from the next read of the node
        if path is not None:
            self._load(path)

    @classmethod
    def in_state_dir(cls, state_dir: str | Path, *, writable: bool = True) -> StopLedger:
        """The node's record: state_dir/remote-stops.json."""
        return cls(Path(state_dir) / NAME, writable=writable)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._lose(path, str(exc))
            return
        try:
            self._stops, self._window = _parse(data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._lose(path, f"not a record of remote stops: {exc!r}")

    def _lose(self, path: Path, why: str) -> None:
        log.error("stop_ledger_unreadable", path=str(path), error=why,
                  consequence="every guest stopped at the next read counts as stopped by a remote source, now")
        self._lost = True

    def idle(self) -> bool:
        """Nothing to settle: no remote stop counts, and the record was read (a tick builds nothing then)."""
        with self._lock:
            return not self._stops and not self._lost

    def stopped(self) -> dict[int, RemoteStop]:
        """vmid -> the remote stop that still counts."""
        with self._lock:
            return dict(self._stops)

    def used(self, *, now: float, window: float) -> int:
        """Remote stops admitted within ``window`` seconds before ``now``."""
        with self._lock:
            return sum(1 for at in self._window if at > now - window)

    def record(self, vmids: Iterable[int], *, now: float, window: float) -> bool:
        """Count remote stops admitted now, durably; False (and nothing counted) when that cannot be written."""
        with self._lock:
            stops, times = dict(self._stops), list(self._window)
            self._window = [at for at in self._window if at > now - window]
            for vmid in vmids:
                self._stops[vmid] = RemoteStop(at=now)
                self._window.append(now)
            if self._save():
                return True
            self._stops, self._window = stops, times
            return False

    def stop_ended(self, vmid: int, *, ran: bool | None) -> None:
        """A remote stop's lane ended: it ran (seen stopped), did not (forgotten), or nobody knows (None: kept)."""
        with self._lock:
            stop = self._stops.get(vmid)
            if ran is None or stop is None or stop.seen:
                return
            if ran:
                self._stops[vmid] = RemoteStop(at=stop.at, seen=True)
            else:
                del self._stops[vmid]
            self._save()

    def settle(self, *, status: Mapping[int, str], present: Set[int], held: Set[int], now: float,
               grace: float, save: bool = True) -> None:
        """Bring the record up to date with a read of the whole node (see ``safety.blast.settle``)."""
        with self._lock:
            stops, window = self._stops, self._window
            if self._lost:
                # Who stopped what, and when, is unknown: every stopped guest is a remote stop, made now.
                seeded = {vmid: RemoteStop(at=now, seen=True) for vmid, state in status.items() if state == "stopped"}
                stops, window = {**seeded, **stops}, [*window, *[now] * len(seeded)]
            settled = settle(stops, status=status, present=present, held=held, now=now, grace=grace)
            if settled == self._stops and window == self._window and not self._lost:
                return
            self._stops, self._window = settled, window
            if save and self._save():
                self._lost = False

    def _save(self) -> bool:
        """Write the record (atomically, synced); False when it could not be."""
        if not self._writable or self._path is None:
            return self._path is None  # memory only: nothing to write; the dry run: never written
        data = {"version": VERSION, "window": self._window,
                "stopped": {str(vmid): {"at": s.at, "seen": s.seen} for vmid, s in sorted(self._stops.items())}}
        try:
            write_private(self._path, json.dumps(data, sort_keys=True).encode())
        except OSError as exc:
            log.error("stop_ledger_unwritable", path=str(self._path), error=str(exc),
                      consequence="remote stops wait until their record can be written")
            return False
        return True


def _parse(data: Any) -> tuple[dict[int, RemoteStop], list[float]]:
    """The record's content, strictly (anything else raises)."""
    if not isinstance(data, dict) or data.get("version") != VERSION or set(data) != {"version", "window", "stopped"}:
        raise ValueError("unknown version or fields")
    window = [_number(at) for at in data["window"]]
    stops = {}
    for vmid, entry in data["stopped"].items():
        if set(entry) != {"at", "seen"} or not isinstance(entry["seen"], bool):
            raise ValueError(f"entry {vmid!r}")
        stops[int(vmid)] = RemoteStop(at=_number(entry["at"]), seen=entry["seen"])
    return stops, window


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a time: {value!r}")
    return float(value)
