"""The executor's action table: one row per action kind, as the planner's normalizer registry.

A row holds everything the executor knows of a kind: the Proxmox call (made only by the gate,
which holds the writer), the params it takes, the check the gate runs on the config as read right
before the call (a disk resize that would shrink), the task types recovery looks for when a UPID was
never journaled, the error texts that mean "already there", how recovery tells from the guest's
state that the change happened, and whether the kind is one-shot (run once for a signed op) or
convergent (re-planned from the next read). A kind missing from the table is refused by the gate as
unknown.

The destructive kinds (docs/SAFETY.md §1.3) are named as the signed ops that run them, with the op's
params (``safety.opschema``); config ops run as ``set_config`` (``force`` in their params).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from executor.errors import InvalidInputError
from executor.gate.actions import SET_CONFIG, START, STOP, Step
from executor.pve.node import LXC, QEMU, GuestState, PveError, PveReader, PveWriter

DESTROY, RESIZE = "guest.destroy", "disk.resize"
SNAPSHOT, ROLLBACK, DELETE_SNAPSHOT = "snapshot.create", "snapshot.rollback", "snapshot.delete"

ParamSpec = Mapping[str, tuple[type, bool]]  # name -> (type, required)
Shows = Callable[[PveReader, GuestState | None, Mapping[str, Any]], bool]  # None: the guest is not on the node


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSettings:
    """How the calls are made (stop: PVE's graceful shutdown, then a forced stop after the timeout)."""

    shutdown_timeout: int = 60
    force_stop: bool = True


class StepError(PveError, InvalidInputError):
    """A step the table cannot run as given (a param missing or of the wrong type): raised before any request."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400)


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionKind:
    """One kind of action."""

    name: str
    call: Callable[[PveWriter, Step, CallSettings], str | None]
    task_types: tuple[str, ...]
    already_there: tuple[str, ...]  # PVE error texts (lowercase) that mean the guest is already there
    shows: Shows  # recovery: the state shows the change
    one_shot: bool = False  # recovery: no task and the digest as planned means the call was never made
    # Guest types whose call answers at once and leaves no task (LXC's config PUT): a lost answer
    # leaves nothing to look for; the digest the write carries makes the next plan safe instead.
    untasked: frozenset[str] = frozenset()
    params: ParamSpec = field(default_factory=dict)
    validate: Callable[[Step, Mapping[str, str]], str | None] | None = None

    def is_already_there(self, error: str) -> bool:
        """PVE's "already in the desired state" answers are successes (LXC: "CT 101 not running")."""
        text = error.lower()
        return any(marker in text for marker in self.already_there)

    def check(self, step: Step, config: Mapping[str, str]) -> str | None:
        """Why ``step`` must not run on a guest with ``config`` as just read (None: it may), before any call."""
        return bad_params(step, self.params) or (self.validate(step, config) if self.validate else None)


def bad_params(step: Step, spec: ParamSpec) -> str | None:
    """The first param of ``step`` that ``spec`` does not take, lacks or gets with the wrong type."""
    params = dict(step.params)
    unknown = sorted(set(params) - set(spec))
    if unknown:
        return f"{step.kind}: params.{unknown[0]} is not a parameter of it"
    for name, (kind, required) in spec.items():
        if name not in params:
            if required:
                return f"{step.kind}: params.{name} is required"
        elif type(params[name]) is not kind:  # type(): True is an int in Python
            return f"{step.kind}: params.{name} must be a {kind.__name__}, not {params[name]!r}"
    return None


def param(step: Step, name: str, kind: type, default: Any = None) -> Any:
    """One param of ``step``, checked again by the call itself: StepError rather than a wrong request."""
    value = dict(step.params).get(name, default)
    if type(value) is not kind:
        raise StepError(f"{step.kind}: params.{name} must be a {kind.__name__}, not {value!r}")
    return value


# --- sizes: PVE's \d+(\.\d+)?[KMGT]? strings, in bytes ---------------------------------------------

UNITS = {"T": 1 << 40, "G": 1 << 30, "M": 1 << 20, "K": 1 << 10}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)")


def size_text(size: int) -> str:
    """Bytes as PVE's size string: in the largest unit that divides them exactly, else plain bytes."""
    for unit, factor in UNITS.items():
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def size_bytes(text: str) -> int | None:
    """A PVE size (``32G``, ``528K``, ``1.5G``, ``4096``) in bytes, as PVE rounds it; None if it is not one."""
    found = _SIZE.fullmatch(text.strip())
    if found is None:
        return None
    return int(Fraction(found.group(1)) * UNITS.get(found.group(2), 1))


def disk_size(value: str) -> int | None:
    """The ``size=`` of a disk or mount point value, in bytes (None: absent or unreadable)."""
    sizes = [size_bytes(token.strip()[5:]) for token in value.split(",") if token.strip().startswith("size=")]
    return sizes[0] if len(sizes) == 1 else None


# --- calls -------------------------------------------------------------------------------------

def _set_config(w: PveWriter, s: Step, _c: CallSettings) -> str | None:
    if param(s, "force", bool, False):
        return w.set_config(s.guest_type, s.vmid, dict(s.set), s.delete, s.digest, force=True)
    # Without force the five-argument form, which every writer (and every wrapper of one) takes.
    return w.set_config(s.guest_type, s.vmid, dict(s.set), s.delete, s.digest)


def _destroy(w: PveWriter, s: Step, _c: CallSettings) -> str:
    return w.destroy(s.guest_type, s.vmid, purge=param(s, "purge", bool),
                     destroy_unreferenced_disks=param(s, "destroy_unreferenced_disks", bool))


def _resize(w: PveWriter, s: Step, _c: CallSettings) -> str | None:
    size = param(s, "size", int)
    if size < 1:
        raise StepError(f"{s.kind}: params.size must be a positive number of bytes, not {size}")
    return w.resize(s.guest_type, s.vmid, param(s, "disk", str), size_text(size), s.digest)


def _snapshot(w: PveWriter, s: Step, _c: CallSettings) -> str:
    return w.snapshot(s.guest_type, s.vmid, param(s, "snapname", str), vmstate=param(s, "vmstate", bool, False))


def _rollback(w: PveWriter, s: Step, _c: CallSettings) -> str:
    return w.rollback(s.guest_type, s.vmid, param(s, "snapname", str))


def _delete_snapshot(w: PveWriter, s: Step, _c: CallSettings) -> str:
    return w.delete_snapshot(s.guest_type, s.vmid, param(s, "snapname", str), force=param(s, "force", bool, False))


# --- checks on the config as read, right before the call ---------------------------------------

def _config_valid(step: Step, _config: Mapping[str, str]) -> str | None:
    if not dict(step.params).get("force"):
        return None
    if step.guest_type != QEMU:
        return ("config: LXC's config API has no force: detach (the volume becomes unusedN), then delete "
                "the unusedN with its own op")
    return None if step.delete else "config: force frees deleted disks, and this step deletes nothing"


def _resize_valid(step: Step, config: Mapping[str, str]) -> str | None:
    params = dict(step.params)
    disk, size = params["disk"], params["size"]
    if size < 1:
        return f"{step.kind}: params.size must be a positive number of bytes, not {size}"
    value = config.get(disk)
    if value is None:
        return f"{step.kind}: {disk} is not in the config of guest {step.vmid}"
    if "media=cdrom" in value:
        return f"{step.kind}: {disk} is a CD-ROM, which has no size to grow"
    current = disk_size(value)
    if current is None:
        return f"{step.kind}: {disk} has no size= in its config, so a grow cannot be told from a shrink"
    if size < current:
        return (f"{step.kind}: {size} bytes would shrink {disk} from {current} bytes "
                f"({size_text(size)} < {size_text(current)}); PVE only grows disks")
    return None


def _snapshot_valid(step: Step, _config: Mapping[str, str]) -> str | None:
    if dict(step.params).get("vmstate") and step.guest_type != QEMU:
        return f"{step.kind}: vmstate saves a VM's RAM; LXC snapshots have none"
    return None


# --- recovery: does the state show the change? --------------------------------------------------

def _config_shows(reader: PveReader, guest: GuestState | None, payload: Mapping[str, Any]) -> bool:
    if guest is None:
        return False
    config, _ = reader.config(guest.type, guest.vmid)
    wanted = payload.get("set", {})
    return all(config.get(k) == v for k, v in wanted.items()) and not set(payload.get("delete", [])) & set(config)


def _op_params(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    params = payload.get("params")
    return params if isinstance(params, Mapping) else {}


def _grown(reader: PveReader, guest: GuestState | None, payload: Mapping[str, Any]) -> bool:
    params = _op_params(payload)
    if guest is None or not isinstance(params.get("size"), int):
        return False
    value = reader.config(guest.type, guest.vmid)[0].get(str(params.get("disk")))
    current = disk_size(value) if value is not None else None
    return current is not None and current >= params["size"]


def _has_snapshot(reader: PveReader, guest: GuestState | None, payload: Mapping[str, Any]) -> bool | None:
    """Whether the op's snapshot exists (None: the guest is not on the node)."""
    if guest is None:
        return None
    return _op_params(payload).get("snapname") in reader.snapshots(guest.type, guest.vmid)


_SNAPNAME: ParamSpec = {"snapname": (str, True)}

ACTION_KINDS: Mapping[str, ActionKind] = {kind.name: kind for kind in (
    ActionKind(name=START, call=lambda w, s, _c: w.start(s.guest_type, s.vmid),
               task_types=("qmstart", "vzstart"), already_there=("already running",),
               shows=lambda _r, guest, _p: guest is not None and guest.status == "running"),
    ActionKind(name=STOP, call=lambda w, s, c: w.shutdown(s.guest_type, s.vmid, c.shutdown_timeout, c.force_stop),
               task_types=("qmshutdown", "vzshutdown", "qmstop", "vzstop"), already_there=("not running",),
               shows=lambda _r, guest, _p: guest is not None and guest.status == "stopped"),
    ActionKind(name=SET_CONFIG, call=_set_config, task_types=("qmconfig",), already_there=(), shows=_config_shows,
               params={"force": (bool, False)}, validate=_config_valid, untasked=frozenset({LXC})),
    ActionKind(name=DESTROY, call=_destroy, task_types=("qmdestroy", "vzdestroy"), already_there=(),
               shows=lambda _r, guest, _p: guest is None, one_shot=True,
               params={"purge": (bool, True), "destroy_unreferenced_disks": (bool, True)}),
    # PVE 8+ answers a resize with a task, of type "resize" for QEMU and LXC alike.
    ActionKind(name=RESIZE, call=_resize, task_types=("resize",),
               already_there=("already at specified size",), shows=_grown, one_shot=True,
               params={"disk": (str, True), "size": (int, True)}, validate=_resize_valid),
    ActionKind(name=SNAPSHOT, call=_snapshot, task_types=("qmsnapshot", "vzsnapshot"), already_there=(),
               shows=lambda r, guest, p: _has_snapshot(r, guest, p) is True, one_shot=True,
               params={**_SNAPNAME, "vmstate": (bool, False)}, validate=_snapshot_valid),
    # A rollback leaves nothing in the state that tells it ran: only its task does.
    ActionKind(name=ROLLBACK, call=_rollback, task_types=("qmrollback", "vzrollback"), already_there=(),
               shows=lambda _r, _g, _p: False, one_shot=True, params=_SNAPNAME),
    ActionKind(name=DELETE_SNAPSHOT, call=_delete_snapshot, task_types=("qmdelsnapshot", "vzdelsnapshot"),
               already_there=(), shows=lambda r, guest, p: _has_snapshot(r, guest, p) is False, one_shot=True,
               params={**_SNAPNAME, "force": (bool, False)}),
)}
