"""Every Proxmox answer the executor reads, parsed strictly at the edge.

What the executor reads of an answer is checked against what PVE's API schema promises (the
apidoc fakepve ships): guest-list entries, config values and digest, pending entries, task status,
task lists, cluster resources and status, snapshots. An answer that does not parse raises
``MalformedAnswerError`` naming what was wrong; the adapter (``executor.pve.node``) turns that into a PveError that
names the guest. Nothing here imports the rest of the executor.

Lists are read in two ways. Where an entry that is not an object only costs that entry (guest
lists, cluster resources and status), it is dropped and noted. Where the list is evidence of
absence (a task list proves a lost call never ran, a snapshot list that a snapshot is gone), any
entry that does not parse makes the whole answer unreadable: a dropped entry could be the one
looked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from executor.errors import PermanentError

VMID_MIN, VMID_MAX = 100, 999_999_999
KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")  # every key of PVE's QEMU and LXC config schemas ([n] as digits)
DIGEST = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 of the config file today; SHA-256 accepted too
RUN_STATES = frozenset({"running", "stopped"})  # the guest lists' status enum
PAUSED = frozenset({"paused", "suspended", "prelaunch"})  # QEMU's qmpstatus of a running VM that does not run
TASK_STATES = frozenset({"running", "stopped"})
UPID = re.compile(r"UPID:[A-Za-z0-9][A-Za-z0-9.-]*:[0-9A-Fa-f]{8}:[0-9A-Fa-f]{8,9}:[0-9A-Fa-f]{8}:[^:\s]+:[^:\s]*:"
                  r"[^:\s]+:")


class MalformedAnswerError(PermanentError, ValueError):
    """An answer that is not what PVE's API promises; the message says what was wrong."""


def kind_of(value: object) -> str:
    """A JSON type for messages, with its article (``null``, ``a string``, ``an object``...)."""
    names = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def _text(value: object, what: str, *, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise MalformedAnswerError(f"{what} is {kind_of(value)}, not a string")
    return value


def vmid_of(value: object, what: str = "vmid") -> int:
    """A vmid: an integer (PVE's type) in 100..999999999; a number in a string is accepted, nothing else."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or not VMID_MIN <= value <= VMID_MAX:
        raise MalformedAnswerError(f"{what} {value!r} is not a vmid")
    return value


def objects(answer: object, what: str) -> tuple[list[Mapping[str, Any]], list[str]]:
    """A list answer's object entries, and a note for each entry that is not one (dropped). null is empty."""
    if answer is None:
        return [], []
    if not isinstance(answer, list):
        raise MalformedAnswerError(f"{what} is {kind_of(answer)}, not a list")
    kept: list[Mapping[str, Any]] = []
    dropped: list[str] = []
    for index, entry in enumerate(answer):
        if isinstance(entry, dict):
            kept.append(entry)
        else:
            dropped.append(f"{what}[{index}] is {kind_of(entry)}, not an object")
    return kept, dropped


def all_objects(answer: object, what: str) -> list[Mapping[str, Any]]:
    """A list answer whose every entry must be an object (a list that is evidence of absence)."""
    kept, dropped = objects(answer, what)
    if dropped:
        raise MalformedAnswerError(dropped[0])
    return kept


def guest_entry(entry: Mapping[str, Any]) -> tuple[int, str, str]:
    """One guest-list entry: (vmid, run state with QEMU's paused folded in, lock). The vmid is read first,
    so a MalformedAnswerError raised after it can name the guest (``vmid_of(entry["vmid"])`` succeeds)."""
    vmid = vmid_of(entry.get("vmid"))
    status = entry.get("status")
    if not isinstance(status, str) or status not in RUN_STATES:
        raise MalformedAnswerError(f"status {status!r} is not one of {sorted(RUN_STATES)}")
    qmpstatus = _text(entry.get("qmpstatus"), "qmpstatus", optional=True)
    lock = _text(entry.get("lock"), "lock", optional=True)
    return vmid, "paused" if status == "running" and qmpstatus in PAUSED else str(status), lock


def value_text(value: object, what: str) -> str:
    """A config value as the planner compares it: strings as they are, numbers as they read, booleans 1/0."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(value)
    raise MalformedAnswerError(f"{what} is {kind_of(value)}, not a string or a number")


def _config_value(key: str, value: object) -> str:
    """A config value as text; LXC's raw keys (``lxc``, a list of pairs) as the config file's lines."""
    return _raw_lxc(value) if key == "lxc" and isinstance(value, list) else value_text(value, key)


def _raw_lxc(value: object) -> str:
    """LXC's raw ``lxc.*`` lines, which the config answer gives as [[key, value], ...]: as the file's lines."""
    if not isinstance(value, list):
        raise MalformedAnswerError(f"lxc is {kind_of(value)}, not a list of [key, value] pairs")
    lines = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise MalformedAnswerError(f"lxc holds {pair!r}, not a [key, value] pair of strings")
        lines.append(f"{pair[0]}: {pair[1]}")
    return "\n".join(lines)


def config_answer(answer: object) -> tuple[dict[str, str], str]:
    """GET .../config: every key a PVE key, every value a string or number, and a digest (no digest, no facts)."""
    if not isinstance(answer, dict):
        raise MalformedAnswerError(f"the config is {kind_of(answer)}, not an object")
    digest = answer.get("digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise MalformedAnswerError("the config has no digest" if digest is None
                        else f"the config's digest {digest!r} is not a hex SHA digest")
    config = {}
    for key, value in answer.items():
        if key == "digest":
            continue
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise MalformedAnswerError(f"config key {key!r} is not a PVE config key")
        config[key] = _config_value(key, value)
    return config, digest


def pending_answer(answer: object) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    """GET .../pending: (current values, pending values, pending deletes) by key."""
    current, pending, deleted = {}, {}, set()
    for entry in all_objects(answer, "pending"):
        key = entry.get("key")
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise MalformedAnswerError(f"pending key {key!r} is not a PVE config key")
        if "value" in entry:
            current[key] = _config_value(key, entry["value"])
        if "pending" in entry:
            pending[key] = _config_value(key, entry["pending"])
        flag = entry.get("delete", 0)
        if flag not in (0, 1, 2) or isinstance(flag, bool):  # 1: pending delete, 2: forced delete
            raise MalformedAnswerError(f"pending delete flag {flag!r} of {key} is not 0, 1 or 2")
        if flag:
            deleted.add(key)
    return current, pending, frozenset(deleted)


def task_status_answer(answer: object) -> dict[str, str]:
    """GET /tasks/{upid}/status: ``status`` running or stopped; a stopped task's ``exitstatus`` (text)."""
    if not isinstance(answer, dict):
        raise MalformedAnswerError(f"the task status is {kind_of(answer)}, not an object")
    status = answer.get("status")
    if not isinstance(status, str) or status not in TASK_STATES:
        raise MalformedAnswerError(f"task status {status!r} is not running or stopped")
    if status == "running":
        return {"status": "running"}
    return {"status": "stopped", "exitstatus": _text(answer.get("exitstatus"), "exitstatus", optional=True)}


def task_list(answer: object) -> list[dict[str, Any]]:
    """GET /nodes/{node}/tasks: each entry's upid, type, id and starttime; any entry that does not parse
    makes the list unreadable (it could be the task looked for)."""
    tasks = []
    for entry in all_objects(answer, "the task list"):
        upid = _text(entry.get("upid"), "a task's upid")
        if not UPID.fullmatch(upid):
            raise MalformedAnswerError(f"task upid {upid!r} is not a UPID")
        started = entry.get("starttime")
        if type(started) is not int or started < 0:
            raise MalformedAnswerError(f"task {upid}: starttime {started!r} is not a Unix time")
        tasks.append({"upid": upid, "type": _text(entry.get("type"), f"task {upid}: type"),
                      "id": _text(entry.get("id"), f"task {upid}: id", optional=True), "starttime": started})
    return tasks


def resources_answer(answer: object) -> tuple[dict[int, str], list[str]]:
    """GET /cluster/resources?type=vm: vmid -> node; entries that do not parse are dropped (noted)."""
    kept, dropped = objects(answer, "cluster resources")
    placed = {}
    for entry in kept:
        if "vmid" not in entry:
            continue
        try:
            placed[vmid_of(entry["vmid"])] = _text(entry.get("node"), "node")
        except MalformedAnswerError as exc:
            dropped.append(f"cluster resources entry {entry.get('id')!r}: {exc}")
    return placed, dropped


def cluster_name_answer(answer: object) -> tuple[str, list[str]]:
    """GET /cluster/status: the name of the entry of type cluster ("" outside a cluster).

    "Outside a cluster" is read only from a whole answer that lists the node and no cluster: an empty
    (null) answer, or one with an entry dropped, may have lost the cluster's entry, and taking it for a
    standalone node would make its audience another machine's (``node`` alone) for the daemon's life.
    """
    kept, dropped = objects(answer, "cluster status")
    for entry in kept:
        if entry.get("type") == "cluster":
            return _text(entry.get("name"), "the cluster's name"), dropped
    if dropped or not any(entry.get("type") == "node" for entry in kept):
        raise MalformedAnswerError("cluster status names no cluster and is not a whole answer (no node entry, "
                                   f"or {len(dropped)} entry dropped): in a cluster or not is unknown")
    return "", dropped


def snapshot_names(answer: object) -> list[str]:
    """GET .../snapshot: every snapshot's name but ``current``; an entry without a name makes it unreadable."""
    names = [_text(entry.get("name"), "a snapshot's name") for entry in all_objects(answer, "the snapshot list")]
    return [name for name in names if name != "current"]
