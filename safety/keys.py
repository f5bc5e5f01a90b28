"""The key table: the single source of how each PVE config key is classed (SAFETY-DESIGN §4.1).

Rows of (regex, guest types, rule), first full match wins, like the planner's normalizer registry. A
rule judges one key of a config write: its new value (None for a delete) against the value as read.
A key no row matches is unknown and needs approval: we fail closed, but we do not halt.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Protocol

from safety.model import Class, Judgment, is_on

QEMU = frozenset({"qemu"})
LXC = frozenset({"lxc"})
ANY = QEMU | LXC

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_OFF = frozenset({"0", "off", "no", "false"})


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChange:
    """One key of a config write, with what the executor read of it."""

    key: str
    value: str | None  # None: the key is deleted
    actual: str | None  # None: absent (or the config was not read)
    config_read: bool
    vmid: int = 0  # the guest written to (a volume of another guest is never this guest's to attach)

    @property
    def verb(self) -> str:
        """"delete" or "write", for reasons."""
        return "delete" if self.value is None else "write"


class KeyRule(Protocol):
    """How one kind of config key is classed."""

    def judge(self, change: KeyChange) -> Judgment:
        """The class of this one change, with its op kind, rule name and a reason naming the key."""


def _judgment(change: KeyChange, cls: Class, op_kind: str, rule: str, why: str) -> Judgment:
    return Judgment(cls=cls, op_kind=op_kind, rule=rule, reason=f"{change.key}: {change.verb} {why}")


def fields(value: str) -> list[tuple[str | None, str]]:
    """A property string as (name, value) tokens in order; a bare token has no name."""
    tokens: list[tuple[str | None, str]] = []
    for raw in value.split(","):
        token = raw.strip()
        if token:
            name, eq, val = token.partition("=")
            tokens.append((name.strip(), val.strip()) if eq else (None, token))
    return tokens


_OWNER = re.compile(r"(?:^|[:/])(?:vm|base|subvol)-(\d+)-")


def _foreign_volume(value: str, volume: str | None, vmid: int) -> str | None:
    """Why a disk value reaches beyond this guest's own volumes (None: it does not).

    Another guest's volume (``vm-N-``, ``base-N-``, ``subvol-N-``: two writers on one disk, or data
    read across guests), a host path, or an import from elsewhere are never a plain attach.
    """
    if "import-from=" in value:
        return "imports a volume from elsewhere (copies data across guests or from the host)"
    if volume is not None and volume.startswith("/"):
        return f"passes the host path {volume!r} to the guest"
    owner = _OWNER.search(volume or "")
    if owner is not None and vmid and int(owner.group(1)) != vmid:
        return f"attaches {volume!r}, a volume of guest {owner.group(1)}"
    return None


# Parameters of PVE's config endpoints that are not config keys: a "key" of that name in a write
# would become the parameter itself (``delete=scsi1``, ``force=1``, ``skiplock=1``).
API_PARAMETERS = frozenset({"delete", "revert", "digest", "force", "skiplock", "background_delay", "node",
                            "vmid", "current", "snapshot"})


def default_field(value: str, name: str) -> str | None:
    """The field PVE reads as ``name``: the bare token or ``name=``; None when absent or ambiguous."""
    found = {val for key, val in fields(value) if key is None or key == name}
    return found.pop() if len(found) == 1 else None


def macs(value: str) -> frozenset[str]:
    """Every MAC a NIC value carries: QEMU ``macaddr=`` or ``model=MAC``, LXC ``hwaddr=`` (uppercased)."""
    return frozenset(val.upper() for _, val in fields(value) if _MAC.match(val))


@dataclass(frozen=True, slots=True, kw_only=True)
class Fixed:
    """One class whatever the value, for a write and a delete alike."""

    cls: Class
    op_kind: str
    rule: str
    why: str

    def judge(self, change: KeyChange) -> Judgment:
        """The fixed class."""
        return _judgment(change, self.cls, self.op_kind, self.rule, self.why)


@dataclass(frozen=True, slots=True, kw_only=True)
class Protection:
    """Raising ``protection`` is benign; lowering it (1→0 or a delete) needs approval."""

    def judge(self, change: KeyChange) -> Judgment:
        """0→1 benign, 1→0 or delete approval; an unreadable current value counts as on."""
        if change.value is None:
            return _judgment(change, Class.APPROVAL, "config.protection_off", "protection_off",
                             "lowers PVE's only removal guard")
        if is_on(change.value):
            return _judgment(change, Class.BENIGN, "config", "protection_on", "raises a safeguard")
        if change.value.strip().lower() not in _OFF:
            return _judgment(change, Class.APPROVAL, "config.protection_off", "protection_off",
                             f"of {change.value!r}, not a PVE boolean: may lower the removal guard")
        if change.config_read and not is_on(change.actual):
            return _judgment(change, Class.BENIGN, "config", "protection_unchanged", "keeps protection off")
        return _judgment(change, Class.APPROVAL, "config.protection_off", "protection_off",
                         "turns protection 1→0: lowers PVE's only removal guard")


@dataclass(frozen=True, slots=True, kw_only=True)
class Nic:
    """``netN``: connectivity is benign, the NIC's identity (its MAC) is not (SAFETY-DESIGN F1)."""

    def judge(self, change: KeyChange) -> Judgment:
        """Benign when the actual MAC is kept or the NIC is new; approval when the MAC is lost."""
        if change.value is None:
            return self._identity(change, "removes the NIC and its MAC")
        if not change.config_read:
            return self._identity(change, "with the config not read: cannot tell whether the MAC is kept")
        if change.actual is None:
            return _judgment(change, Class.BENIGN, "config", "nic_new", "adds a NIC where there was none")
        return self._compare(change, macs(change.actual), macs(change.value))

    def _compare(self, change: KeyChange, old: frozenset[str], new: frozenset[str]) -> Judgment:
        if not old:
            return _judgment(change, Class.BENIGN, "config", "nic_no_mac", "of a NIC that has no MAC to keep")
        if new == old:
            return _judgment(change, Class.BENIGN, "config", "nic_keeps_mac", f"keeps the MAC {_list(old)}")
        if not new:
            return self._identity(change, f"drops the MAC {_list(old)}: PVE draws a new one")
        return self._identity(change, f"changes the MAC {_list(old)} to {_list(new)}")

    @staticmethod
    def _identity(change: KeyChange, why: str) -> Judgment:
        return _judgment(change, Class.APPROVAL, "config.nic_identity", "nic_identity", why)


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A disk key: attach and option changes need approval; a swap or a detach is destructive."""

    volume_field: str  # "file" (QEMU) or "volume" (LXC)

    def judge(self, change: KeyChange) -> Judgment:
        """Absent → attach; same volume → options; another volume → swap; delete → detach."""
        if change.value is None:
            return _judgment(change, Class.DESTRUCTIVE, "config.disk_detach", "disk_detach",
                             "detaches a disk (hot-unplugged mid-I/O when running; with force the volume is freed)")
        new = default_field(change.value, self.volume_field)
        if not change.config_read:
            return _judgment(change, Class.DESTRUCTIVE, "config.disk_swap", "disk_swap",
                             "with the config not read: cannot tell an attach from a volume swap")
        foreign = _foreign_volume(change.value, new, change.vmid)
        if foreign is not None:
            return _judgment(change, Class.DESTRUCTIVE, "config.disk_swap", "disk_foreign", foreign)
        if change.actual is None:
            return _judgment(change, Class.APPROVAL, "config.disk_attach", "disk_attach",
                             f"attaches {new!r} to an empty slot (allocates storage)")
        old = default_field(change.actual, self.volume_field)
        if new is not None and new == old:
            return _judgment(change, Class.APPROVAL, "config.disk_options", "disk_options",
                             "changes options of the same volume (backup=0, replicate=0, cache=unsafe drop safeguards)")
        return _judgment(change, Class.DESTRUCTIVE, "config.disk_swap", "disk_swap",
                         f"replaces volume {old!r} with {new!r}: the old one is detached or dropped")


@dataclass(frozen=True, slots=True, kw_only=True)
class Unused:
    """``unusedN`` and ``vmstate``: PVE's records of volumes no drive uses; deleting one removes it."""

    what: str

    def judge(self, change: KeyChange) -> Judgment:
        """Destructive both ways: a delete frees the volume, a write stops PVE tracking it."""
        if change.value is None:
            return _judgment(change, Class.DESTRUCTIVE, "config.unused_delete", "unused_delete",
                             f"physically removes {self.what}")
        return _judgment(change, Class.DESTRUCTIVE, "config.unused_write", "unused_write",
                         f"overwrites PVE's record of {self.what}: that volume is no longer tracked")


@dataclass(frozen=True, slots=True, kw_only=True)
class HostDevice:
    """Host device passthrough needs approval; a value naming no host device (``socket``, ``spice``) is benign."""

    device_field: str
    free: frozenset[str] = frozenset()

    def judge(self, change: KeyChange) -> Judgment:
        """Approval unless a write names one of the device-free values."""
        if change.value is not None and default_field(change.value, self.device_field) in self.free:
            return _judgment(change, Class.BENIGN, "config", "host_device_free", "names no host device")
        return _judgment(change, Class.APPROVAL, "config.host_device", "host_device",
                         "of a host device: moves it between the host and the guest (root-only in PVE)")


def _list(values: frozenset[str]) -> str:
    return ",".join(sorted(values))


BENIGN_KEY = Fixed(cls=Class.BENIGN, op_kind="config", rule="benign_key",
                   why="of a benign key: loses no data, undone by writing the old value")
HOST_CODE = Fixed(cls=Class.DESTRUCTIVE, op_kind="config.host_code", rule="host_code",
                  why="of host code: the hook script or QEMU args run as root on the host")
UNKNOWN_KEY = Fixed(cls=Class.APPROVAL, op_kind="config.unknown_key", rule="unknown_key",
                    why="of a key the key table does not know: needs approval (fail closed)")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRow:
    """A rule for the keys ``pattern`` fully matches, on the given guest types."""

    pattern: re.Pattern[str]
    types: frozenset[str]
    rule: KeyRule


def row(pattern: str, types: frozenset[str], rule: KeyRule) -> KeyRow:
    """Shorthand for a KeyRow from a regex source."""
    return KeyRow(pattern=re.compile(pattern), types=types, rule=rule)


KEY_TABLE: tuple[KeyRow, ...] = (
    row("protection", ANY, Protection()),
    row("template", ANY, Fixed(cls=Class.DESTRUCTIVE, op_kind="config.template", rule="template",
                               why="of the template flag: the path to an irreversible conversion")),
    row("hookscript|args", ANY, HOST_CODE),
    # Raw LXC keys (lxc.hook.*, lxc.mount.entry) reach the host the way args does.
    row(r"lxc\..+", LXC, HOST_CODE),
    row(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0", QEMU, Disk(volume_field="file")),
    row(r"rootfs|mp\d+", LXC, Disk(volume_field="volume")),
    # Disk keys of the other guest type are left to the unknown-key rule (PVE refuses them).
    row(r"unused\d+", ANY, Unused(what="the unused volume")),
    row("vmstate", ANY, Unused(what="the saved RAM state")),
    row(r"net\d+", ANY, Nic()),
    row(r"hostpci\d+|parallel\d+", QEMU, HostDevice(device_field="host")),
    row(r"usb\d+", QEMU, HostDevice(device_field="host", free=frozenset({"spice"}))),
    row(r"serial\d+", QEMU, HostDevice(device_field="path", free=frozenset({"socket"}))),
    row(r"dev\d+", LXC, HostDevice(device_field="path")),
    row("description|tags|onboot|startup|memory|cores|cpulimit|cpuunits|ostype|nameserver|searchdomain",
        ANY, BENIGN_KEY),
    row(r"name|balloon|sockets|vcpus|cpu|numa|agent|vga|boot|hotplug|bios|machine|acpi|kvm|tablet|localtime"
        r"|ipconfig\d+|ciuser|sshkeys", QEMU, BENIGN_KEY),
    row("hostname|swap|cmode|console|tty", LXC, BENIGN_KEY),
)


@functools.lru_cache(maxsize=4096)
def lookup(guest_type: str, key: str) -> KeyRule:
    """The rule for ``key`` on a guest of ``guest_type``; ``UNKNOWN_KEY`` when no row matches."""
    return next((r.rule for r in KEY_TABLE if guest_type in r.types and r.pattern.fullmatch(key)), UNKNOWN_KEY)


def known(guest_type: str, key: str) -> bool:
    """Whether the key table has a row for ``key`` on this guest type."""
    return lookup(guest_type, key) is not UNKNOWN_KEY
