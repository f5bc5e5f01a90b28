"""The closed params schema of every signable op kind, and the ASCII identifier rules (docs/SAFETY.md §6.2).

One registry maps an op kind to its fields; a field is a validator and a default. A field the kind does
not name, a value of the wrong type, or a list that is not sorted and unique is MALFORMED: every op has
exactly one meaning. Validated params are returned read-only (tuples and mapping proxies), with defaults
filled in, so two payloads that mean the same action compare equal.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from safety.keys import API_PARAMETERS
from safety.refusal import RefusalReason, Refused

# The names of safety.model.Class (REVERSIBLE_WITH_APPROVAL is spelled APPROVAL there); BENIGN needs no signature.
APPROVAL, DESTRUCTIVE = "APPROVAL", "DESTRUCTIVE"
SIGNABLE_CLASSES = frozenset({APPROVAL, DESTRUCTIVE})
TTL_CEILING = {APPROVAL: 24 * 3600, DESTRUCTIVE: 3600}  # seconds, whatever a role allows (docs/SAFETY.md §6.6)
VMID_MIN, VMID_MAX = 100, 999_999_999
SIZE_MAX = 1 << 53
NOT_SHOWN = "<not shown>"  # what the API answers for a secret key's value (the key's presence is shown)
DESCRIPTION_MAX = 8192


def _ascii(pattern: str) -> re.Pattern[str]:
    # re.ASCII: without it \w and \d match Cyrillic letters and Arabic digits (homoglyphs, row 24).
    return re.compile(pattern, re.ASCII)


AUDIENCE = _ascii(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._-]{0,63})?")
KIND = _ascii(r"[a-z][a-z_]{0,31}(\.[a-z][a-z_]{0,31})?")
ROLE = _ascii(r"[a-z][a-z0-9_-]{0,63}")
CONFIG_KEY = _ascii(r"[a-z][a-z0-9_-]{0,63}")
DISK = _ascii(r"(ide|sata|scsi|virtio|mp|unused)[0-9]{1,3}|efidisk0|tpmstate0|rootfs")
SNAPNAME = _ascii(r"[A-Za-z][A-Za-z0-9_-]{1,39}")
STORAGE = _ascii(r"[A-Za-z][A-Za-z0-9._-]{0,99}")
NODE = _ascii(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
OP_ID = _ascii(r"[0-9a-f]{32}")
_LINE_BREAK_OR_NUL = re.compile("[\x00\r\n]")

Validator = Callable[[str, object], object]


def malformed(path: str, reason: str) -> Refused:
    """The refusal for a payload field ``path`` that breaks a rule."""
    return Refused(RefusalReason.MALFORMED, f"{path}: {reason}")


def checked_fields(raw: Mapping[str, Any], fields: Sequence[str], validators: Mapping[str, Validator],
                   where: str) -> dict[str, Any]:
    """Exactly ``fields`` in ``raw`` (none unknown, none missing), each through its validator; MALFORMED names
    ``where.field`` at fault. A field without a validator is left to the caller (checked against others)."""
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise malformed(f"{where}.{unknown[0]}", f"is not a {where} field")
    missing = [name for name in fields if name not in raw]
    if missing:
        raise malformed(f"{where}.{missing[0]}", "is required")
    return {name: check(f"{where}.{name}", raw[name]) for name, check in validators.items()}


def boolean(path: str, value: object) -> bool:
    """A JSON true or false (never 0/1 or "true")."""
    if type(value) is not bool:
        raise malformed(path, "must be true or false")
    return value


def integer(low: int, high: int) -> Validator:
    """A JSON integer in [low, high]; ``type(x) is int`` because True is an int in Python."""
    def check(path: str, value: object) -> int:
        if type(value) is not int or not low <= value <= high:
            raise malformed(path, f"must be an integer in {low}..{high}")
        return value
    return check


def text(pattern: re.Pattern[str], what: str) -> Validator:
    """A string matching ``pattern`` in full."""
    def check(path: str, value: object) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise malformed(path, f"must be {what}")
        return value
    return check


def sorted_unique(item: Validator, *, nonempty: bool = False) -> Validator:
    """A JSON list of items in strictly increasing order: one spelling per set of items (row 25)."""
    def check(path: str, value: object) -> tuple[object, ...]:
        if not isinstance(value, list) or (nonempty and not value):
            raise malformed(path, "must be a non-empty list" if nonempty else "must be a list")
        items = [item(f"{path}[{i}]", v) for i, v in enumerate(value)]
        if any(a >= b for a, b in itertools.pairwise(items)):  # type: ignore[operator]
            raise malformed(path, "must be sorted and hold no duplicates")
        return tuple(items)
    return check


def config_map(path: str, value: object) -> Mapping[str, str]:
    """Config keys to values as PVE takes them: no NUL or line break, except that descriptions span lines."""
    if not isinstance(value, dict):
        raise malformed(path, "must be an object of config keys to strings")
    for key, item in value.items():
        text(CONFIG_KEY, "a PVE config key")(f"{path} key", key)
        if key in API_PARAMETERS:
            raise malformed(f"{path}.{key}", "is a parameter of PVE's config call, not a config key")
        if not isinstance(item, str):
            raise malformed(f"{path}.{key}", "must be a string")
        if key == "description":
            if "\x00" in item or len(item) > DESCRIPTION_MAX:
                raise malformed(f"{path}.{key}", f"holds NUL or exceeds {DESCRIPTION_MAX} characters")
        elif _LINE_BREAK_OR_NUL.search(item):
            raise malformed(f"{path}.{key}", "holds a line break or NUL, which PVE refuses")
    return MappingProxyType(dict(sorted(value.items())))


def _config_shape(path: str, params: Mapping[str, object]) -> None:
    changed = params["set"], params["delete"]
    if not any(changed):
        raise malformed(path, "sets and deletes nothing")
    both = set(changed[0]) & set(changed[1])  # type: ignore[call-overload]
    if both:
        raise malformed(path, f"sets and deletes {sorted(both)}")


_REQUIRED = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class KindSchema:
    """The params one op kind takes: name -> (validator, default or required), plus a whole-params check."""

    fields: Mapping[str, tuple[Validator, object]]
    check: Callable[[str, Mapping[str, object]], None] | None = field(default=None)


_NONE = KindSchema(fields={})
_CONFIG_FIELDS: dict[str, tuple[Validator, object]] = {
    "set": (config_map, MappingProxyType({})),
    "delete": (sorted_unique(text(CONFIG_KEY, "a PVE config key")), ()),
}
_CONFIG = KindSchema(fields=_CONFIG_FIELDS, check=_config_shape)
_SNAPNAME = (text(SNAPNAME, "a PVE snapshot name"), _REQUIRED)
_DISK = (text(DISK, "a disk key such as scsi1"), _REQUIRED)
_STORAGE = (text(STORAGE, "a PVE storage id"), _REQUIRED)
_FALSE = (boolean, False)

SCHEMAS: Mapping[str, KindSchema] = MappingProxyType({
    "start": _NONE,
    "stop": _NONE,
    **{kind: _CONFIG for kind in (
        "config", "config.protection_off", "config.nic_identity", "config.host_device", "config.host_code",
        "config.disk_attach", "config.disk_options", "config.disk_swap", "config.unused_delete", "config.template",
        "config.unknown_key", "config.unused_write", "config.guest_credentials", "config.nic_firewall_off",
        "config.guest_identity", "config.lock", "config.isolation", "config.pve_internal", "config.unreadable",
        "config.host_disk", "config.guest_code", "config.boot_device")},
    "config.disk_detach": KindSchema(fields={**_CONFIG_FIELDS, "force": _FALSE}, check=_config_shape),
    "disk.resize": KindSchema(fields={"disk": _DISK, "size": (integer(1, SIZE_MAX), _REQUIRED)}),
    "disk.move": KindSchema(fields={"disk": _DISK, "storage": _STORAGE}),
    "disk.move_delete": KindSchema(fields={"disk": _DISK, "storage": _STORAGE}),
    "disk.reassign": KindSchema(fields={"disk": _DISK, "target_vmid": (integer(VMID_MIN, VMID_MAX), _REQUIRED),
                                        "target_disk": _DISK}),
    "snapshot.create": KindSchema(fields={"snapname": _SNAPNAME, "vmstate": _FALSE}),
    "snapshot.rollback": KindSchema(fields={"snapname": _SNAPNAME}),
    "snapshot.delete": KindSchema(fields={"snapname": _SNAPNAME, "force": _FALSE}),
    "guest.migrate": KindSchema(fields={"target": (text(NODE, "a PVE node name"), _REQUIRED),
                                        "online": _FALSE, "with_local_disks": _FALSE}),
    "guest.template": _NONE,
    # Both flags are required: whoever signs a destroy states whether it reaches backups and stray volumes.
    "guest.destroy": KindSchema(fields={"purge": (boolean, _REQUIRED),
                                        "destroy_unreferenced_disks": (boolean, _REQUIRED)}),
    # A veto: names the signed op RevokeOp stops for good (docs/SAFETY.md §6.7).
    "op.revoke": KindSchema(fields={"op_id": (text(OP_ID, "32 lowercase hex (the op to revoke)"), _REQUIRED)}),
})
DESIRED_APPLY = "desired.apply"  # signs a hub's desired-state document (safety.desireddoc), never an op on a guest
# Every kind a trust store role may name. desired.apply has no params schema, so an op of that kind is
# refused UNKNOWN_KIND by canonical_params: a document role can never sign a guest action.
OP_KINDS = frozenset(SCHEMAS) | {DESIRED_APPLY}


def canonical_params(kind: str, raw: object, *, path: str = "params") -> Mapping[str, object]:
    """``raw`` checked against ``kind``'s closed schema, defaults filled in, read-only.

    Raises Refused(UNKNOWN_KIND) for a kind without a schema and Refused(MALFORMED) naming the field.
    """
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise Refused(RefusalReason.UNKNOWN_KIND, f"kind {kind!r} is not a signable op kind")
    if not isinstance(raw, dict):
        raise malformed(path, "must be an object")
    unknown = sorted(set(raw) - set(schema.fields))
    if unknown:
        raise malformed(f"{path}.{unknown[0]}", f"is not a field of {kind}")
    params: dict[str, object] = {}
    for name, (validate, default) in schema.fields.items():
        if name in raw:
            params[name] = validate(f"{path}.{name}", raw[name])
        elif default is _REQUIRED:
            raise malformed(f"{path}.{name}", f"is required for {kind}")
        else:
            params[name] = default
    if schema.check is not None:
        schema.check(path, params)
    return MappingProxyType(params)


def plain(value: object) -> object:
    """Read-only params as plain JSON values (dicts and lists), for dumping and comparing."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value
