"""The key table: the single source of how each PVE config key is classed (docs/SAFETY.md §2.1).

Rows of (regex, guest types, rule), first full match wins, like the planner's normalizer registry.
Every key of PVE's API schema has a row with its reason (``tests/test_pve_grammar.py`` enumerates
the schema, so a key a PVE release adds fails until it has one). A rule judges one key of a config
write: its new value (None for a delete) against the value as read, both read with PVE's own
grammar (``safety.grammar``): a value the grammar cannot read raises ``UnreadableError``, which the
classifier takes for destructive. A key no row matches is not in PVE's schema and needs approval.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from safety import grammar
from safety.model import Class, Judgment, is_on

QEMU = frozenset({"qemu"})
LXC = frozenset({"lxc"})
ANY = QEMU | LXC

_OFF = frozenset({"0", "off", "no", "false"})
_MAC_FIELD = {"qemu": "macaddr", "lxc": "hwaddr"}
NIC_KEY = re.compile(r"net[0-9]+", re.ASCII)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChange:
    """One key of a config write, with what the executor read of it."""

    key: str
    value: str | None  # None: the key is deleted
    actual: str | None  # None: absent (or the config was not read)
    config_read: bool
    vmid: int = 0  # the guest written to (a volume of another guest is never this guest's to attach)
    guest_type: str = "qemu"
    config: Mapping[str, str] | None = None  # the whole config as read, for rules that look beside the key

    @property
    def verb(self) -> str:
        """"delete" or "write", for reasons."""
        return "delete" if self.value is None else "write"

    def new_fields(self) -> dict[str, str] | None:
        """The written value's fields by PVE's grammar (None: deleted, or the key has no format)."""
        return None if self.value is None else grammar.parse(self.guest_type, self.key, self.value)

    def old_fields(self) -> dict[str, str] | None:
        """The value as read, by PVE's grammar; ``UnreadableError`` says so of the value as read."""
        if self.actual is None:
            return None
        try:
            return grammar.parse(self.guest_type, self.key, self.actual)
        except grammar.UnreadableError as exc:
            raise grammar.UnreadableError(f"the value as read: {exc}") from None


class KeyRule(Protocol):
    """How one kind of config key is classed."""

    def judge(self, change: KeyChange) -> Judgment:
        """The class of this one change, with its op kind, rule name and a reason naming the key."""


def _judgment(change: KeyChange, cls: Class, op_kind: str, rule: str, why: str) -> Judgment:
    return Judgment(cls=cls, op_kind=op_kind, rule=rule, reason=f"{change.key}: {change.verb} {why}")


# Parameters of PVE's config endpoints that are not config keys: a "key" of that name in a write
# would become the parameter itself (``delete=scsi1``, ``force=1``, ``skiplock=1``).
API_PARAMETERS = frozenset({"delete", "revert", "digest", "force", "skiplock", "background_delay", "node",
                            "vmid", "current", "snapshot", "import-working-storage"})


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
class Privilege:
    """LXC ``unprivileged``: a privileged container's root is root on the host."""

    def judge(self, change: KeyChange) -> Judgment:
        """Privileged (0, or a delete: PVE's default) is host code; unprivileged remaps every file's owner."""
        if change.value is not None and is_on(change.value):
            return _judgment(change, Class.APPROVAL, "config.isolation", "unprivileged_on",
                             "remaps the container's uids: its files' owners no longer match")
        return _judgment(change, Class.DESTRUCTIVE, "config.host_code", "privileged_container",
                         "makes the container privileged: its root is root on the host")


@dataclass(frozen=True, slots=True, kw_only=True)
class Nic:
    """``netN``: connectivity is benign; the NIC's identity (its MAC) and its firewall are not (docs/SAFETY.md §2.1)."""

    def judge(self, change: KeyChange) -> Judgment:
        """Benign when the actual MAC and firewall are kept or the NIC is new; approval otherwise."""
        if change.value is None:
            return self._identity(change, "removes the NIC and its MAC")
        new = change.new_fields() or {}
        if not change.config_read:
            return self._identity(change, "with the config not read: cannot tell whether the MAC is kept")
        old = change.old_fields()
        field = _MAC_FIELD[change.guest_type]
        if old is None:
            if new.get(field):  # a chosen MAC may be another guest's: an identity taken, not drawn
                return self._identity(change, f"adds a NIC with the chosen MAC {new[field].upper()}")
            if new.get("firewall") != "1" and _firewalled(change):
                return _judgment(change, Class.APPROVAL, "config.nic_firewall_off", "nic_firewall_off",
                                 "adds a NIC without the firewall the guest's other NICs have: a path past PVE's "
                                 "firewall and anti-spoofing filters")
            return _judgment(change, Class.BENIGN, "config", "nic_new", "adds a NIC where there was none (PVE draws "
                                                                      "its MAC)")
        return self._over(change, field, old, new)

    def _over(self, change: KeyChange, field: str, old: dict[str, str], new: dict[str, str]) -> Judgment:
        """A write over a NIC that is there: its MAC, then its firewall."""
        was, now = old.get(field, "").upper(), new.get(field, "").upper()
        if was and now != was:
            why = f"changes the MAC {was} to {now}" if now else f"drops the MAC {was}: PVE draws a new one"
            return self._identity(change, why)
        if old.get("firewall") == "1" and new.get("firewall") != "1":
            return _judgment(change, Class.APPROVAL, "config.nic_firewall_off", "nic_firewall_off",
                             "turns the NIC's firewall 1→0: it leaves PVE's firewall and anti-spoofing filters")
        why = f"keeps the MAC {was}" if was else "of a NIC that has no MAC to keep"
        return _judgment(change, Class.BENIGN, "config", "nic_keeps_mac" if was else "nic_no_mac", why)

    @staticmethod
    def _identity(change: KeyChange, why: str) -> Judgment:
        return _judgment(change, Class.APPROVAL, "config.nic_identity", "nic_identity", why)


def _firewalled(change: KeyChange) -> bool:
    """Whether another NIC of the guest, as read, has PVE's firewall on (a value that does not read counts as on)."""
    for key, value in (change.config or {}).items():
        if key != change.key and NIC_KEY.fullmatch(key):
            try:
                if (grammar.parse(change.guest_type, key, value) or {}).get("firewall") == "1":
                    return True
            except grammar.UnreadableError:
                return True
    return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk:
    """A disk key: attach and option changes need approval; a swap, a detach or a foreign volume is destructive."""

    volume_field: str  # "file" (QEMU) or "volume" (LXC)

    def judge(self, change: KeyChange) -> Judgment:
        """Absent → attach; same volume → options; another volume → swap; delete → detach."""
        if change.value is None:
            return _judgment(change, Class.DESTRUCTIVE, "config.disk_detach", "disk_detach",
                             "detaches a disk (hot-unplugged mid-I/O when running; with force the volume is freed)")
        new = change.new_fields() or {}
        if not change.config_read:
            return self._swap(change, "disk_swap", "with the config not read: cannot tell an attach from a volume swap")
        volume = new.get(self.volume_field)
        if volume is None:
            raise grammar.UnreadableError(f"no {self.volume_field} field")
        foreign = grammar.reach(volume, change.vmid, cdrom=new.get("media") == "cdrom")
        if "import-from" in new:
            foreign = "imports a volume from elsewhere (copies data across guests or from the host)"
        if foreign is not None:
            return self._swap(change, "disk_foreign", foreign)
        old = change.old_fields()
        if old is None:
            return _judgment(change, Class.APPROVAL, "config.disk_attach", "disk_attach",
                             f"attaches {volume!r} to an empty slot (allocates storage)")
        before = old.get(self.volume_field)
        if before is None:
            raise grammar.UnreadableError(f"the value as read has no {self.volume_field} field")
        return self._over(change, volume, before)

    def _over(self, change: KeyChange, volume: str, before: str) -> Judgment:
        """A write over a disk that is there: options, a new medium, or a swap."""
        if volume == before:
            return _judgment(change, Class.APPROVAL, "config.disk_options", "disk_options",
                             "changes options of the same volume (backup=0, replicate=0, cache=unsafe drop safeguards)")
        # Both an ISO or nothing, in a cdrom drive (``reach`` let the new one through only as media=cdrom).
        if {grammar.volume(volume).kind, grammar.volume(before).kind} <= {"iso", "none"}:
            return _judgment(change, Class.APPROVAL, "config.disk_options", "disk_media",
                             f"changes the medium {before!r} to {volume!r} (no volume of the guest's own)")
        return self._swap(change, "disk_swap", f"replaces volume {before!r} with {volume!r}: the old one is "
                                               "detached or dropped")

    @staticmethod
    def _swap(change: KeyChange, rule: str, why: str) -> Judgment:
        return _judgment(change, Class.DESTRUCTIVE, "config.disk_swap", rule, why)


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

    device_field: str | None  # None: the whole value names the device (serialN, parallelN)
    free: frozenset[str] = frozenset()

    def judge(self, change: KeyChange) -> Judgment:
        """Approval unless a write names one of the device-free values."""
        if change.value is not None:
            fields = change.new_fields()
            device = change.value if self.device_field is None or fields is None else fields.get(self.device_field)
            if device is not None and device.lower() in self.free:
                return _judgment(change, Class.BENIGN, "config", "host_device_free", "names no host device")
        return _judgment(change, Class.APPROVAL, "config.host_device", "host_device",
                         "of a host device: moves it between the host and the guest (root-only in PVE)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Smbios:
    """``smbios1``: its ``uuid`` is the guest's identity, like a MAC; the other fields are labels."""

    def judge(self, change: KeyChange) -> Judgment:
        """Benign while the uuid is kept (or there was none); approval when it changes or goes."""
        was = (change.old_fields() or {}).get("uuid", "").lower() if change.config_read else "?"
        now = (change.new_fields() or {}).get("uuid", "").lower()
        if now != was and (was or now):
            return _judgment(change, Class.APPROVAL, "config.guest_identity", "smbios_uuid",
                             "sets, changes or drops the guest's SMBIOS uuid: its identity to licences, clusters "
                             "and management")
        return _judgment(change, Class.BENIGN, "config", "smbios_labels", "keeps the SMBIOS uuid")


# Character devices a container or a serial port may be given with one approval; any other host device
# (a block device: the host's disks) is destructive.
_CHAR_DEVICES = re.compile(r"/dev/(?:dri/[A-Za-z0-9_-]+|net/tun|fuse|kvm|vhost-net|vhost-vsock|tty[A-Za-z0-9]*"
                           r"|snd/[A-Za-z0-9_-]+|bus/usb/[0-9]{3}/[0-9]{3}|hidraw[0-9]+|input/[A-Za-z0-9_-]+|null|zero"
                           r"|u?random|nvidia[0-9a-z-]*)", re.ASCII)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostPath:
    """A host device path given to the guest: a known character device needs approval, anything else (a disk) more."""

    device_field: str | None  # None: the whole value is the path (serialN)
    free: frozenset[str] = frozenset()

    def judge(self, change: KeyChange) -> Judgment:
        """Benign for a device-free value, approval for an allowed character device, destructive otherwise."""
        if change.value is None:
            return HostDevice(device_field=self.device_field).judge(change)
        fields = change.new_fields()
        path = change.value if self.device_field is None or fields is None else fields.get(self.device_field, "")
        if path.lower() in self.free:
            return _judgment(change, Class.BENIGN, "config", "host_device_free", "names no host device")
        if _CHAR_DEVICES.fullmatch(path):
            return HostDevice(device_field=self.device_field).judge(change)
        return _judgment(change, Class.DESTRUCTIVE, "config.host_disk", "host_disk",
                         f"gives the guest the host device {path!r}, not a known character device: a host disk "
                         "read or wiped from inside")


@dataclass(frozen=True, slots=True, kw_only=True)
class BootOrder:
    """``boot``: the order is benign; a new first device (a network boot, another disk) needs approval."""

    def judge(self, change: KeyChange) -> Judgment:
        """Approval when the device booted first changes (a PXE image of the source's choosing reads the disks)."""
        was = _first_boot_device(change.old_fields()) if change.config_read else "?"
        now = _first_boot_device(change.new_fields())
        if was != now:
            return _judgment(change, Class.APPROVAL, "config.boot_device", "boot_device",
                             f"changes the device booted first ({was or 'PVE default'} to {now or 'PVE default'}): "
                             "what boots first reads every disk")
        return _judgment(change, Class.BENIGN, "config", "boot_order", f"keeps {now or 'the default'} first")


def _first_boot_device(fields: dict[str, str] | None) -> str:
    if not fields:
        return ""
    if fields.get("order"):
        return fields["order"].split(";")[0]
    return {"c": "disk", "d": "cdrom", "n": "network", "a": "floppy"}.get(fields.get("legacy", "")[:1], "")


def _fixed(cls: Class, op_kind: str, rule: str, why: str) -> Fixed:
    return Fixed(cls=cls, op_kind=op_kind, rule=rule, why=why)


BENIGN_KEY = _fixed(Class.BENIGN, "config", "benign_key", "of a benign key: loses no data, undone by writing the "
                                                          "old value")
HOST_CODE = _fixed(Class.DESTRUCTIVE, "config.host_code", "host_code",
                   "of host code: the hook script, QEMU args or raw LXC keys run as root on the host")
UNKNOWN_KEY = _fixed(Class.APPROVAL, "config.unknown_key", "unknown_key",
                     "of a key PVE's schema does not have: needs approval (fail closed)")
CREDENTIALS = _fixed(Class.APPROVAL, "config.guest_credentials", "guest_credentials",
                     "of who logs in to the guest (cloud-init applies it at the next boot): a login is granted by an "
                     "operator's approval, never by whoever writes the desired state")
SHARES_HOST = _fixed(Class.APPROVAL, "config.host_device", "host_share",
                     "of a host resource shared into the guest (a host directory or host memory)")
PVE_INTERNAL = _fixed(Class.DESTRUCTIVE, "config.pve_internal", "pve_internal",
                      "of a key PVE keeps for itself (resume state, snapshot tree, machine pinning): never ours to "
                      "change")
BENIGN_QEMU = ("name|balloon|sockets|vcpus|smp|cpu|numa|numa\\d+|agent|vga|hotplug|bios|machine|acpi"
               "|kvm|tablet|localtime|ipconfig\\d+|citype|ciupgrade|keyboard|reboot|affinity|allow-ksm|amd-sev"
               "|intel-tdx|audio0|autostart|freeze|hugepages|keephugepages|migrate_downtime|migrate_speed|scsihw"
               "|shares|spice_enhancements|startdate|tdf|vmstatestorage|watchdog")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRow:
    """A rule for the keys ``pattern`` fully matches, on the given guest types."""

    pattern: re.Pattern[str]
    types: frozenset[str]
    rule: KeyRule


def row(pattern: str, types: frozenset[str], rule: KeyRule) -> KeyRow:
    """Shorthand for a KeyRow from a regex source."""
    return KeyRow(pattern=re.compile(pattern, re.ASCII), types=types, rule=rule)


KEY_TABLE: tuple[KeyRow, ...] = (
    row("protection", ANY, Protection()),
    row("template", ANY, _fixed(Class.DESTRUCTIVE, "config.template", "template",
                                "of the template flag: the path to an irreversible conversion")),
    row("hookscript", ANY, HOST_CODE),
    row("args", QEMU, HOST_CODE),
    # Raw LXC keys (lxc.hook.*, lxc.mount.entry; GET lists them under "lxc") reach the host the way args does.
    row(r"lxc|lxc\..+", LXC, HOST_CODE),
    row("unprivileged", LXC, Privilege()),
    # cdrom is PVE's alias of ide2 (the classifier rewrites it first; the row keeps the table complete).
    row(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|cdrom", QEMU, Disk(volume_field="file")),
    row(r"rootfs|mp\d+", LXC, Disk(volume_field="volume")),
    # Disk keys of the other guest type are left to the unknown-key rule (PVE refuses them).
    row(r"unused\d+", ANY, Unused(what="the unused volume")),
    row("vmstate", QEMU, Unused(what="the saved RAM state")),
    row("meta|parent|running-nets-host-mtu|runningcpu|runningmachine|snaptime", QEMU, PVE_INTERNAL),
    row(r"net\d+", ANY, Nic()),
    row(r"hostpci\d+", QEMU, HostDevice(device_field="host")),
    row(r"parallel\d+", QEMU, HostDevice(device_field=None)),
    row(r"usb\d+", QEMU, HostDevice(device_field="host", free=frozenset({"spice"}))),
    row(r"serial\d+", QEMU, HostPath(device_field=None, free=frozenset({"socket"}))),
    row("rng0", QEMU, HostDevice(device_field="source", free=frozenset({"/dev/urandom", "/dev/random"}))),
    row(r"dev\d+", LXC, HostPath(device_field="path")),
    row(r"virtiofs\d+|ivshmem", QEMU, SHARES_HOST),
    row("ciuser|sshkeys|cipassword|cicustom", QEMU, CREDENTIALS),
    row("entrypoint|env", LXC, _fixed(Class.APPROVAL, "config.guest_code", "guest_code",
                                      "of what the container runs as its root at start (its init, its environment)")),
    row("boot", QEMU, BootOrder()),
    row("bootdisk", QEMU, _fixed(Class.APPROVAL, "config.boot_device", "boot_device",
                                 "of the disk booted first (PVE's older spelling of boot's order)")),
    row("vmgenid", QEMU, _fixed(Class.APPROVAL, "config.guest_identity", "vmgenid",
                                "of the VM generation id: the guest reads a change as a restore from a snapshot")),
    row("smbios1", QEMU, Smbios()),
    row("lock", ANY, _fixed(Class.APPROVAL, "config.lock", "lock",
                            "of PVE's lock: clearing it lets writes into a running backup, migration or snapshot")),
    row("features", LXC, _fixed(Class.APPROVAL, "config.isolation", "container_features",
                                "of container features (nesting, keyctl, fuse, mknod, mounts): more of the host "
                                "kernel within the container's reach")),
    row("description|tags|onboot|startup|memory|cores|cpulimit|cpuunits|ostype|nameserver|searchdomain|arch",
        ANY, BENIGN_KEY),
    row(BENIGN_QEMU, QEMU, BENIGN_KEY),
    row("hostname|swap|cmode|console|tty|timezone|debug", LXC, BENIGN_KEY),
)


@functools.lru_cache(maxsize=4096)
def lookup(guest_type: str, key: str) -> KeyRule:
    """The rule for ``key`` on a guest of ``guest_type``; ``UNKNOWN_KEY`` when no row matches."""
    return next((r.rule for r in KEY_TABLE if guest_type in r.types and r.pattern.fullmatch(key)), UNKNOWN_KEY)


def known(guest_type: str, key: str) -> bool:
    """Whether the key table has a row for ``key`` on this guest type."""
    return lookup(guest_type, key) is not UNKNOWN_KEY
