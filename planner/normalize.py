"""Field normalizers: when a desired PVE value and the value PVE reports mean the same thing.

PVE does not read back what it was sent: descriptions lose trailing whitespace (LXC adds a final
newline, CRLF becomes LF); numbers and booleans come back as strings in other spellings (``1`` for
``on``); tags are lowercased, deduplicated, sorted and ``;``-joined; an emptied value reads back as
``" "``; keys at their default are omitted; property strings (``net0``, ``cpu``...) come back with
their fields reordered and a generated MAC added; ``1024M`` comes back as ``1G``; ``cipassword``
reads back as stars. Compared naively, each of these is drift forever.

Each quirk is one ``FieldRule``; a ``Registry`` maps (guest type, key) to its rule. New quirks are
new rules in the registry, never edits to the plan. All rules treat a blank value as absent, and an
absent value as the key's PVE default where one is known. A rule also gives the value to write:
PVE replaces a property string whole, so a property string is written as actual's fields with the
desired ones laid over them (``PropertyString.write``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Protocol

from planner.model import GuestType

QEMU = frozenset({GuestType.QEMU})
LXC = frozenset({GuestType.LXC})
ANY = frozenset({GuestType.QEMU, GuestType.LXC})

_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TAG_SPLIT = re.compile(r"[;,\s]+")
NIC_MODELS = frozenset({
    "e1000", "e1000-82540em", "e1000-82544gc", "e1000-82545em", "e1000e", "i82551", "i82557b",
    "i82559er", "ne2k_isa", "ne2k_pci", "pcnet", "rtl8139", "virtio", "vmxnet3",
})


def is_blank(value: str | None) -> bool:
    """PVE reads an emptied value back as "" or " ": both mean absent."""
    return value is None or not value.strip()


def canon_number(value: str) -> str:
    """"2048", "2048.0" and " 2048" are one number; non-numbers stay as they are."""
    try:
        number = Decimal(value.strip())
    except InvalidOperation:
        return value
    if not number.is_finite():
        return value
    return format(number.normalize(), "f") if number else "0"


def canon_bool(value: str) -> str:
    """PVE accepts 1/on/yes/true and 0/off/no/false, and reports 1/0."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return "1"
    if lowered in _FALSE:
        return "0"
    return value


def canon_size(value: str) -> str:
    """Sizes as bytes: PVE reports ``1024M`` as ``1G``; a bare number is bytes."""
    match = _SIZE.match(value.strip())
    if not match:
        return value
    number = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    return str(int(number))


def canon_inner(name: str, value: str) -> str:
    """One property-string field: MACs case-insensitive, booleans 1/0, numbers, sizes in bytes."""
    if name == "size":
        return canon_size(value)
    if _MAC.match(value):
        return value.upper()
    lowered = value.lower()
    if lowered in _TRUE or lowered in _FALSE:
        return canon_bool(value)
    return canon_number(value)


class FieldRule(Protocol):
    """How one kind of PVE config value compares and is written."""

    @property
    def data_bearing(self) -> bool:
        """Disks and volumes: compared, never written in this phase."""

    @property
    def comparable(self) -> bool:
        """False for values PVE never reads back truthfully (write-only, generated)."""

    def same(self, desired: str, actual: str | None) -> bool:
        """Whether ``actual`` (None: absent) already satisfies ``desired``."""

    def write(self, desired: str, actual: str | None) -> str:
        """The value to send so that ``actual`` (None: absent) becomes ``desired``, in PVE's write form."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Canonical:
    """Values equal when their canonical forms are: ``canon`` of the value, absent -> default."""

    canon: Callable[[str], str] = str.strip
    default: str | None = None
    writer: Callable[[str], str] | None = None
    data_bearing: bool = False
    comparable: bool = True

    def key(self, value: str | None) -> str | None:
        """Canonical form; None for absent without a default."""
        if is_blank(value):
            value = self.default
            if value is None:
                return None
        assert value is not None
        return self.canon(value)

    def same(self, desired: str, actual: str | None) -> bool:
        """Canonical forms are equal."""
        return self.key(desired) == self.key(actual)

    def write(self, desired: str, actual: str | None) -> str:
        """Desired value through the writer (identity without one); a plain value replaces ``actual``."""
        return self.writer(desired) if self.writer else desired


def canon_tags(value: str) -> str:
    """Tags: split on ';', ',' or spaces, lowercased, deduplicated, sorted."""
    return ";".join(sorted({t.lower() for t in _TAG_SPLIT.split(value) if t}))


def write_tags(value: str) -> str:
    """Tags as PVE stores them: ';'-joined, deduplicated, sorted, case kept."""
    seen: dict[str, str] = {}
    for tag in _TAG_SPLIT.split(value):
        if tag:
            seen.setdefault(tag.lower(), tag)
    return ";".join(seen[k] for k in sorted(seen))


def canon_description(value: str) -> str:
    """Descriptions: CRLF is LF, trailing whitespace of lines and of the text is not content."""
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip()


def text(default: str | None = None) -> Canonical:
    """A plain string (surrounding whitespace ignored)."""
    return Canonical(default=default)


def number(default: str | None = None) -> Canonical:
    """A number that PVE may report as a string or number, in any decimal form."""
    return Canonical(canon=canon_number, default=default)


def boolean(default: str | None = None) -> Canonical:
    """A PVE boolean, written as 1/0 (``True`` is a 400 on a write)."""
    return Canonical(canon=canon_bool, default=default, writer=canon_bool)


TAGS = Canonical(canon=canon_tags, writer=write_tags)
DESCRIPTION = Canonical(canon=canon_description)
UNCOMPARABLE = Canonical(comparable=False)


def split_fields(value: str, default_key: str | None, nic: bool = False) -> Iterator[tuple[str, str, str]]:
    """``(name, value, token)`` per field of ``a,k=v,...``, as written.

    A bare token belongs to ``default_key`` (without one it is a flag: ``1``). With ``nic``, QEMU's
    ``model=MAC`` token (``virtio=BC:24:11:..``) gives two fields, model and macaddr; models are
    lowercase, as PVE's enum is.
    """
    for raw in value.split(","):
        token = raw.strip()
        if not token:
            continue
        name, eq, val = token.partition("=")
        name, val = name.strip(), val.strip()
        if nic and name.lower() in NIC_MODELS:
            yield "model", name.lower(), token
            if eq:
                yield "macaddr", val, token
        elif not eq:
            yield (default_key, token, token) if default_key else (token, "1", token)
        else:
            yield name, val.lower() if nic and name == "model" else val, token


def raw_fields(value: str, default_key: str | None, nic: bool = False) -> dict[str, str]:
    """Fields by name as written (a repeated name: the last one counts, as in PVE)."""
    return {name: val for name, val, _ in split_fields(value, default_key, nic)}


@dataclass(frozen=True, slots=True)
class Pinned:
    """A declared property string: canonical fields, and a pattern proving all of them literally.

    ``proof`` looks in ``,actual,`` for each field spelled as PVE writes it back
    (``,bridge=vmbr0,``, a bare default value, QEMU's ``,virtio=`` model-with-MAC): a match
    settles the comparison in one C-level search, without parsing actual, whose generated MAC
    makes every value unique. No match means: parse and compare field by field.
    """

    fields: dict[str, str]
    proof: re.Pattern[str]


@functools.lru_cache(maxsize=4096)
def pinned(value: str, default_key: str | None, nic: bool = False) -> Pinned:
    """Parse a declared property string once; declared values repeat across a snapshot."""
    fields = {name: canon_inner(name, val) for name, val in raw_fields(value, default_key, nic).items()}
    lookaheads = []
    for name, val in fields.items():
        alternatives = [f",{name}={val},"]
        if name == default_key:
            alternatives.append(f",{val},")
        if nic and name == "model":
            alternatives += [f",{val}=", f",{val},"]
        lookaheads.append("(?=.*(?:" + "|".join(map(re.escape, alternatives)) + "))")
    return Pinned(fields, re.compile("".join(lookaheads), re.DOTALL))


@dataclass(frozen=True, slots=True, kw_only=True)
class PropertyString:
    """``net0``, ``scsi0``, ``rootfs``...: compared parsed, only on the fields desired pins.

    PVE reorders keys, generates MACs (``virtio=BC:24:..``, ``hwaddr=``) and writes ``1`` for
    ``on``; a field the desired value does not mention is PVE's business. An omitted field means
    its zero (``0``/blank), except the fields in ``on_by_default``, where it means ``1``.
    """

    default_key: str | None = None
    default: str | None = None
    nic: bool = False
    # PVE writes the default key's value bare and first (``host,flags=+aes``); startup writes ``order=``.
    bare_default: bool = True
    on_by_default: frozenset[str] = frozenset()
    data_bearing: bool = False
    comparable: bool = True

    def omitted(self, name: str, value: str) -> bool:
        """Whether a field absent from a property string has the canonical ``value``."""
        return value in ("", "1" if name in self.on_by_default else "0")

    def same(self, desired: str, actual: str | None) -> bool:
        """Every field desired pins has that value in actual."""
        if not desired.strip():
            desired = self.default or ""
        if actual is None or not actual.strip():
            actual = self.default or ""
        if not desired or not actual:
            return desired == actual
        want = pinned(desired, self.default_key, self.nic)
        if want.proof.match(f",{actual},"):
            return True
        # The actual side is usually unique (generated MACs): canonicalize only what is pinned.
        have = raw_fields(actual, self.default_key, self.nic)
        for name, value in want.fields.items():
            found = have.get(name)
            if found is None:
                if not self.omitted(name, value):
                    return False
            elif found != value and canon_inner(name, found) != value:
                return False
        return True

    def write(self, desired: str, actual: str | None) -> str:
        """Actual's fields with the pinned ones laid over them; as declared when actual is absent.

        PVE replaces a property string whole and draws a new MAC for a NIC written without one, so
        every field desired leaves alone is carried over; a field goes only where desired pins it
        to its zero. Actual's order and spellings are kept: a QEMU NIC leads with ``model=MAC``,
        a bare default value leads, new fields come last.
        """
        if actual is None or is_blank(actual) or is_blank(desired):
            return desired
        key, nic = self.default_key, self.nic
        fields = {name: (val, token) for name, val, token in split_fields(actual, key, nic)}
        for name, val, _ in split_fields(desired, key, nic):
            old = fields.get(name)
            canonical = canon_inner(name, val)
            if canonical in ("", "0") and self.omitted(name, canonical):
                fields.pop(name, None)
            elif old is None or canon_inner(name, old[0]) != canonical:
                bare = name == key and (old[1] == old[0] if old else self.bare_default)
                fields[name] = (val, val if bare else f"{name}={val}")
        return ",".join(self._tokens(fields)) or desired

    def _tokens(self, fields: dict[str, tuple[str, str]]) -> list[str]:
        """Tokens in PVE's write form: the NIC's ``model=MAC`` or a bare default value first."""
        head, key = "", self.default_key
        if self.nic:
            model, mac = (fields.pop(name, ("", ""))[0] for name in ("model", "macaddr"))
            head = f"{model}={mac}" if model and mac else model or (mac and f"macaddr={mac}")
        elif key is not None and key in fields and fields[key][0] == fields[key][1]:  # written bare
            head = fields.pop(key)[1]
        rest = [token for _, token in fields.values()]
        return [head, *rest] if head else rest


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A rule for the keys ``pattern`` fully matches, on the given guest types."""

    pattern: re.Pattern[str]
    types: frozenset[GuestType]
    rule: FieldRule


def rule(pattern: str, types: frozenset[GuestType], field_rule: FieldRule) -> Rule:
    """Shorthand for a Rule from a regex source."""
    return Rule(pattern=re.compile(pattern), types=types, rule=field_rule)


@dataclass(frozen=True, slots=True)
class Registry:
    """Ordered rules, first match wins; unmatched keys compare as plain text.

    Lookups are cached per (type, key): a snapshot repeats the same few dozen keys.
    """

    rules: tuple[Rule, ...]
    fallback: FieldRule = field(default_factory=text)
    _cache: dict[tuple[int, str], FieldRule] = field(default_factory=dict, compare=False, repr=False)

    def lookup(self, guest_type: int, key: str) -> FieldRule:
        """The rule for ``key`` on a guest of ``guest_type``."""
        cached = self._cache.get((guest_type, key))
        if cached is None:
            cached = next(
                (r.rule for r in self.rules if guest_type in r.types and r.pattern.fullmatch(key)),
                self.fallback,
            )
            self._cache[(guest_type, key)] = cached
        return cached

    def extended(self, extra: Iterable[Rule]) -> Registry:
        """A new registry whose ``extra`` rules take precedence over these."""
        return Registry((*extra, *self.rules), self.fallback)


def _disk(default_key: str, on_by_default: frozenset[str] = frozenset()) -> PropertyString:
    return PropertyString(default_key=default_key, on_by_default=on_by_default, data_bearing=True)


DEFAULT_RULES: tuple[Rule, ...] = (
    rule("description", ANY, DESCRIPTION),
    rule("tags", ANY, TAGS),
    rule("cipassword|vmgenid", ANY, UNCOMPARABLE),
    # Data-bearing: disks and volumes.
    rule(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0", QEMU, _disk("file", frozenset({"backup", "replicate"}))),
    rule(r"rootfs|mp\d+", LXC, _disk("volume", frozenset({"replicate"}))),
    # A disk key on the wrong guest type is still never written: PVE would allocate or refuse.
    rule(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0|rootfs|mp\d+|unused\d+", ANY, _disk("file")),
    # Numbers (defaults as PVE applies them when the key is absent).
    rule("cores|sockets", QEMU, number("1")),
    rule("memory", QEMU, PropertyString(default_key="current", default="512")),
    rule("memory|swap", LXC, number("512")),
    rule("cpulimit", ANY, number("0")),
    rule("vcpus|cpuunits|balloon|shares|migrate_downtime|migrate_speed|cores|tty", ANY, number()),
    # Booleans.
    rule("onboot|protection|template|numa|freeze|autostart", QEMU, boolean("0")),
    rule("acpi|kvm|tablet|reboot", QEMU, boolean("1")),
    rule("localtime", QEMU, boolean()),
    rule("onboot|protection|template|unprivileged|debug", LXC, boolean("0")),
    rule("console", LXC, boolean("1")),
    # Plain strings with defaults.
    rule("ostype", QEMU, text("other")),
    rule("scsihw", QEMU, text("lsi")),
    rule("bios", QEMU, text("seabios")),
    rule("arch", LXC, text("amd64")),
    rule("cmode", LXC, text("tty")),
    # Property strings.
    rule(r"net\d+", QEMU, PropertyString(default_key="model", nic=True)),
    rule(r"net\d+", LXC, PropertyString()),
    rule("cpu", QEMU, PropertyString(default_key="cputype", default="kvm64")),
    rule("agent", QEMU, PropertyString(default_key="enabled", default="0",
                                       on_by_default=frozenset({"freeze-fs-on-backup"}))),
    rule("vga", QEMU, PropertyString(default_key="type")),
    rule("boot", QEMU, PropertyString(default_key="legacy")),
    rule("startup", ANY, PropertyString(default_key="order", bare_default=False)),
    rule(r"ipconfig\d+|smbios1|features|numa\d+|spice_enhancements|rng0|audio0|watchdog", ANY,
         PropertyString()),
    rule(r"hostpci\d+", QEMU, PropertyString(default_key="host", on_by_default=frozenset({"rombar"}))),
    rule(r"usb\d+", QEMU, PropertyString(default_key="host")),
    rule(r"dev\d+", LXC, PropertyString(default_key="path")),
)

DEFAULT_REGISTRY = Registry(DEFAULT_RULES)
