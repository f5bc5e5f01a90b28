"""The classifier: one action, the guest's facts and the source in; a verdict out (docs/SAFETY.md §1).

Rules are registries, not if-chains: ``KIND_RULES`` gives each action kind its base class, the parameter
flags that raise or explain it, and whether guest facts apply; ``safety.keys`` classes config keys.
The verdict is the maximum of every rule that spoke. Facts and the source can only add candidates,
so they raise a class and never lower it. Unknown kinds are destructive and unknown keys need
approval: fail closed, never halt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from safety import grammar, keys
from safety.model import Action, Class, GuestFacts, Judgment, Source, Verdict, is_on

__all__ = ["KIND_RULES", "Action", "Class", "GuestFacts", "KindRule", "ParamFlag", "Source", "Verdict", "classify"]

TRUSTED_FOR_PROTECTED_POWER = frozenset({Source.LOCAL_FILE, Source.OPERATOR_OP})
"""Sources that may start or stop a guest with ``protection=1`` without approval."""


def truthy(value: object) -> bool:
    """A parameter flag that is set: True, a non-zero int, or a PVE boolean string that is on."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    return isinstance(value, str) and is_on(value)


def present(value: object) -> bool:
    """A parameter given a value at all (``target-vmid``, ``target_vmid``)."""
    return value is not None and value is not False and value != ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamFlag:
    """A parameter of a kind that raises its class or adds a reason (``delete=1`` on a disk move)."""

    names: tuple[str, ...]  # PVE's spelling and ours, e.g. "target-vmid" and "target_vmid"
    when: Callable[[object], bool]
    cls: Class
    op_kind: str
    rule: str
    why: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KindRule:
    """The base class of one action kind and what else about it can raise that class."""

    cls: Class
    op_kind: str
    why: str
    flags: tuple[ParamFlag, ...] = ()
    power: bool = False  # start/stop: a protected guest needs approval unless the source is trusted
    applies_pending: bool = False  # start applies PVE's pending section, drives included


_D, _A, _B = Class.DESTRUCTIVE, Class.APPROVAL, Class.BENIGN
_MOVE_FLAGS = (
    ParamFlag(names=("delete",), when=truthy, cls=_D, op_kind="disk.move_delete", rule="move_delete",
              why="delete=1 frees the source volume after the copy"),
    ParamFlag(names=("target-vmid", "target_vmid"), when=present, cls=_D, op_kind="disk.reassign",
              rule="reassign", why="target-vmid hands the volume to another guest"),
)
_DESTROY_FLAGS = (
    ParamFlag(names=("destroy-unreferenced-disks", "destroy_unreferenced_disks"), when=truthy, cls=_D,
              op_kind="guest.destroy", rule="destroy_unreferenced_disks",
              why="destroy_unreferenced_disks=true also deletes volumes outside the config that carry this vmid, "
                  "on every enabled storage"),
    ParamFlag(names=("purge",), when=truthy, cls=_D, op_kind="guest.destroy", rule="purge",
              why="purge=1 also removes the guest's backup jobs, replication and HA entries"),
)


def _config(cls: Class, op_kind: str, why: str) -> KindRule:
    return KindRule(cls=cls, op_kind=op_kind, why=why)


KIND_RULES: dict[str, KindRule] = {
    "start": KindRule(cls=_B, op_kind="start", why="powers the guest on", power=True, applies_pending=True),
    "stop": KindRule(cls=_B, op_kind="stop", why="graceful shutdown, then a hard stop after the timeout", power=True),
    # Config writes are classed by their keys; a config.* kind also sets a floor of its own.
    "set_config": _config(_B, "config", "a config write, classed by its keys"),
    "config": _config(_B, "config", "a config write, classed by its keys"),
    "config.protection_off": _config(_A, "config.protection_off", "lowers PVE's only removal guard"),
    "config.nic_identity": _config(_A, "config.nic_identity", "changes a NIC's identity"),
    "config.host_device": _config(_A, "config.host_device", "moves a host device"),
    "config.disk_attach": _config(_A, "config.disk_attach", "allocates storage"),
    "config.disk_options": _config(_A, "config.disk_options", "changes a disk's options"),
    "config.host_code": _config(_D, "config.host_code", "runs code of its own on the host as root"),
    "config.disk_swap": _config(_D, "config.disk_swap", "the old volume is detached or dropped"),
    "config.disk_detach": _config(_D, "config.disk_detach", "detaches a disk"),
    "config.unused_delete": _config(_D, "config.unused_delete", "physically removes a volume"),
    "config.template": _config(_D, "config.template", "the path to an irreversible conversion"),
    "config.guest_credentials": _config(_A, "config.guest_credentials", "sets who logs in to the guest"),
    "config.nic_firewall_off": _config(_A, "config.nic_firewall_off", "takes a NIC out of PVE's firewall"),
    "config.guest_identity": _config(_A, "config.guest_identity", "changes the guest's identity"),
    "config.lock": _config(_A, "config.lock", "sets or clears PVE's lock"),
    "config.isolation": _config(_A, "config.isolation", "changes the container's isolation"),
    "config.unknown_key": _config(_A, "config.unknown_key", "a key PVE's schema does not have"),
    "config.unused_write": _config(_D, "config.unused_write", "PVE stops tracking a volume"),
    "config.pve_internal": _config(_D, "config.pve_internal", "a key PVE keeps for itself"),
    "config.unreadable": _config(_D, "config.unreadable", "a value PVE's grammar does not read as we would"),
    "config.host_disk": _config(_D, "config.host_disk", "gives the guest a host device that is not a known "
                                                        "character device"),
    "config.guest_code": _config(_A, "config.guest_code", "sets what a container runs as its root"),
    "config.boot_device": _config(_A, "config.boot_device", "changes the device booted first"),
    "disk.resize": KindRule(cls=_A, op_kind="disk.resize", why="grows a disk: commits capacity for good"),
    "disk.move": KindRule(cls=_A, op_kind="disk.move", why="copies a disk; the old copy stays as unusedN",
                          flags=_MOVE_FLAGS),
    "disk.move_delete": KindRule(cls=_D, op_kind="disk.move_delete", why="frees the source volume after the copy",
                                 flags=_MOVE_FLAGS),
    "disk.reassign": KindRule(cls=_D, op_kind="disk.reassign", why="the volume leaves this guest", flags=_MOVE_FLAGS),
    "snapshot.create": KindRule(cls=_A, op_kind="snapshot.create",
                                why="additive, but a thin pool that fills puts every guest on it read-only"),
    "snapshot.rollback": KindRule(cls=_D, op_kind="snapshot.rollback",
                                  why="all disk and config state since the snapshot is lost"),
    "snapshot.delete": KindRule(cls=_D, op_kind="snapshot.delete", why="a recovery point is lost"),
    "guest.migrate": KindRule(cls=_A, op_kind="guest.migrate",
                              why="the guest leaves this node's authority; no data is lost"),
    "guest.template": KindRule(cls=_D, op_kind="guest.template",
                               why="irreversible: disks become base volumes and the guest can never start"),
    "guest.destroy": KindRule(cls=_D, op_kind="guest.destroy",
                              why="destroys every owned volume, the config, ACLs and firewall rules",
                              flags=_DESTROY_FLAGS),
    "op.revoke": KindRule(cls=_A, op_kind="op.revoke", why="vetoes a signed op before it runs; changes no guest"),
    # Not a guest action (the gate refuses it as a step, UNKNOWN_KIND): the role kind a hub document is signed
    # under. The document's own steps are each classed as a remote source's (Source.HUB).
    "desired.apply": KindRule(cls=_A, op_kind="desired.apply",
                              why="signs a hub's desired-state document; each step it leads to is classed and "
                                  "gated as a remote source's (docs/SAFETY.md §6.9)"),
}
"""Every action kind the classifier knows; any other kind is destructive."""


def classify(action: Action, facts: GuestFacts, source: Source) -> Verdict:
    """The strictest class any rule finds for ``action`` on a guest with ``facts``, from ``source``."""
    rule = KIND_RULES.get(action.kind)
    by_keys = list(_key_judgments(action, facts))
    if rule is None:
        found = [Judgment(cls=_D, op_kind="unknown", rule="unknown_kind",
                          reason=f"unknown action kind {action.kind!r}: refused as destructive (fail closed)")]
    elif rule.cls > _B or not by_keys:
        found = [Judgment(cls=rule.cls, op_kind=rule.op_kind, rule=f"kind:{action.kind}",
                          reason=f"{rule.op_kind}: {rule.why}")]
    else:
        found = []  # a benign config write: its keys decide
    if rule is not None:
        found += _flag_judgments(rule, action)
        found += _fact_judgments(rule, facts, source)
    found += by_keys
    return _verdict(found)


def _verdict(found: list[Judgment]) -> Verdict:
    """The first of the strictest judgments decides; every reason is kept, strictest first."""
    top = max(found, key=lambda j: j.cls)
    ordered = sorted(found, key=lambda j: -j.cls)
    return Verdict(cls=top.cls, op_kind=top.op_kind, rule=top.rule, reasons=tuple(j.reason for j in ordered))


def _key_judgments(action: Action, facts: GuestFacts) -> Iterator[Judgment]:
    """Each written and each deleted key alone, in a stable order (writes, then deletes, sorted).

    A key is judged as PVE writes it (``cdrom`` is ``ide2``), its value read with PVE's grammar: a
    value that does not read, or two spellings of one key in one write, is unreadable: destructive.
    """
    changes: list[tuple[str, str | None]] = [(key, value) for key, value in sorted(action.set.items())]
    changes += [(key, None) for key in sorted(action.delete)]
    written: dict[str, str] = {}
    for key, value in changes:
        target, target_value = grammar.canonical_change(action.guest_type, key, value)
        if target in written:
            yield _unreadable(key, value, f"{written[target]!r} and {key!r} both write {target!r}")
            continue
        written[target] = key
        change = keys.KeyChange(key=target, value=target_value, actual=facts.actual(target),
                                config_read=facts.config is not None, vmid=action.vmid, guest_type=action.guest_type,
                                config=facts.config)
        rule = keys.lookup(action.guest_type, target)
        if grammar.key_spec(action.guest_type, target) is None and not isinstance(rule, keys.Fixed):
            rule = keys.UNKNOWN_KEY  # a row's rule reads PVE's grammar; a key outside PVE's schema has none
        try:
            if target_value is not None:
                grammar.parse(action.guest_type, target, target_value)  # every property string, whatever its row
            yield rule.judge(change)
        except grammar.UnreadableError as exc:
            yield _unreadable(key, value, str(exc))
        except Exception as exc:
            yield _unreadable(key, value, f"{type(exc).__name__}: {exc}")


def _unreadable(key: str, value: str | None, why: str) -> Judgment:
    verb = "delete" if value is None else "write"
    return Judgment(cls=_D, op_kind="config.unreadable", rule="unreadable",
                    reason=f"{key}: {verb} that PVE's grammar does not read as we would ({why}): unreadable is "
                           "destructive")


def _flag_judgments(rule: KindRule, action: Action) -> Iterator[Judgment]:
    for flag in rule.flags:
        if any(flag.when(action.params[name]) for name in flag.names if name in action.params):
            yield Judgment(cls=flag.cls, op_kind=flag.op_kind, rule=flag.rule, reason=f"{rule.op_kind}: {flag.why}")


def _fact_judgments(rule: KindRule, facts: GuestFacts, source: Source) -> Iterator[Judgment]:
    """Guest facts and provenance: each can only add an approval, never take a class down."""
    if rule.power and source not in TRUSTED_FOR_PROTECTED_POWER:
        if facts.config is None:
            yield Judgment(cls=_A, op_kind=rule.op_kind, rule="protected_guest_power",
                           reason=f"{rule.op_kind}: config not read, so protection is unknown, "
                                  f"and the source {source.value} is not trusted with protected guests")
        elif facts.protection:
            yield Judgment(cls=_A, op_kind=rule.op_kind, rule="protected_guest_power",
                           reason=f"{rule.op_kind}: the guest has protection=1 and the source {source.value} "
                                  "is not trusted with protected guests")
    if rule.applies_pending and facts.pending_drive_keys:
        pending = ",".join(sorted(facts.pending_drive_keys))
        yield Judgment(cls=_A, op_kind=rule.op_kind, rule="start_applies_pending_drives",
                       reason=f"{rule.op_kind}: a start applies the pending drive changes ({pending})")
