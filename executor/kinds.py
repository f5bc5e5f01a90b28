"""The executor's action table: one row per action kind, as the planner's normalizer registry.

A row holds everything the executor knows of a kind: the Proxmox call (made only by the gate,
which holds the writer), the task types recovery looks for when a UPID was never journaled, the
error texts that mean "already there", how recovery tells from the guest's state that the change
happened, and whether the kind is one-shot (an idempotency key) or convergent (re-planned from the
next read). A kind missing from the table is refused by the gate as unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from executor.actions import SET_CONFIG, START, STOP, Step
from executor.pve import GuestState, PveReader, PveWriter


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSettings:
    """How the calls are made (stop: PVE's graceful shutdown, then a forced stop after the timeout)."""

    shutdown_timeout: int = 60
    force_stop: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionKind:
    """One kind of action."""

    name: str
    call: Callable[[PveWriter, Step, CallSettings], str | None]
    task_types: tuple[str, ...]
    already_there: tuple[str, ...]  # PVE error texts (lowercase) that mean the guest is already there
    shows: Callable[[PveReader, GuestState, Mapping[str, Any]], bool]  # recovery: the state shows the change
    one_shot: bool = False

    def is_already_there(self, error: str) -> bool:
        """PVE's "already in the desired state" answers are successes (LXC: "CT 101 not running")."""
        text = error.lower()
        return any(marker in text for marker in self.already_there)


def _config_shows(reader: PveReader, guest: GuestState, payload: Mapping[str, Any]) -> bool:
    config, _ = reader.config(guest.type, guest.vmid)
    wanted = payload.get("set", {})
    return all(config.get(k) == v for k, v in wanted.items()) and not set(payload.get("delete", [])) & set(config)


KINDS: Mapping[str, ActionKind] = {kind.name: kind for kind in (
    ActionKind(name=START, call=lambda w, s, _c: w.start(s.guest_type, s.vmid),
               task_types=("qmstart", "vzstart"), already_there=("already running",),
               shows=lambda _r, guest, _p: guest.status == "running"),
    ActionKind(name=STOP, call=lambda w, s, c: w.shutdown(s.guest_type, s.vmid, c.shutdown_timeout, c.force_stop),
               task_types=("qmshutdown", "vzshutdown", "qmstop", "vzstop"), already_there=("not running",),
               shows=lambda _r, guest, _p: guest.status == "stopped"),
    ActionKind(name=SET_CONFIG, call=lambda w, s, _c: w.set_config(s.guest_type, s.vmid, dict(s.set), s.delete,
                                                                   s.digest),
               task_types=("qmconfig",), already_there=(), shows=_config_shows),
)}
