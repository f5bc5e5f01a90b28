"""The desired file's format: YAML ``guests: [{vmid, state, config, description}]`` parsed into ``Declared``.

Pure (safety, yaml and the standard library): the executor's loader, ``desired sign`` and ``pve-hub apply``
all check a file with it, so a document one of them accepts is one every node parses the same way.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import yaml

from desiredfile import configschema
from safety.opschema import DESCRIPTION_MAX

GUEST_KEYS = frozenset({"vmid", "state", "config", "description"})
STATES = frozenset({"running", "stopped"})
_KEY = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_DECIMAL = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)  # 0100 is 64 to YAML 1.1, 100 to int()


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases or explicit tags: the text must read one way, and cost what it weighs.

    An anchored node aliased M times costs M times its size to check, so a few MiB of text could ask for 10^10
    entries (a signed hub document parsed on every node): each guest is written out. The loader judges a
    scalar's text and its implicit type, so an explicit tag (``protection: !!bool y``, "true" to a reviewer,
    "0" here; a ``!!binary`` description) would make it read otherwise than the reader does.
    """

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        """The next node; a ComposerError at an alias or an explicit tag."""
        event = self.peek_event()  # type: ignore[no-untyped-call]
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed (write each "
                                              "guest out)", mark)
        if getattr(event, "tag", None) is not None:
            raise yaml.composer.ComposerError(None, None, f"the explicit tag {str(event.tag)[:40]} is not allowed "
                                              "(write the value plainly)", mark)
        return super().compose_node(parent, index)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class Declared:
    """One guest's declared state; None parts are not managed."""

    vmid: int
    state: str | None = None
    config: Mapping[str, str] | None = field(default=None)
    description: str | None = None
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)  # field -> line in origin
    origin: str = field(default="", compare=False, repr=False)  # the file it was declared in


class DesiredFileError(ValueError):
    """The desired file is invalid; the message names the file, line and field of every mistake (one a line)."""


def parse(text: str, name: str = "<desired>") -> list[Declared]:
    """Parse and check a desired-state document; DesiredFileError names file, line and field of every mistake.

    Config keys and values are checked against PVE's schema for either guest type (the file does not say
    which a guest is); ``check_types`` checks them again against the type the node reports.
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DesiredFileError(f"{name}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise DesiredFileError(f"{name}:{root.start_mark.line + 1}: expected a mapping with a 'guests' list")
    guests_node = None
    for key, value in root.value:
        if key.value != "guests":
            raise DesiredFileError(f"{name}:{key.start_mark.line + 1}: unknown key {key.value!r} (expected 'guests')")
        if guests_node is not None:  # YAML takes the last; a reader takes the first: the text must read one way
            raise DesiredFileError(f"{name}:{key.start_mark.line + 1}: guests: declared twice")
        guests_node = value
    if guests_node is None or (isinstance(guests_node, yaml.ScalarNode) and guests_node.value in ("", "~", "null")):
        return []
    if not isinstance(guests_node, yaml.SequenceNode):
        raise DesiredFileError(f"{name}:{guests_node.start_mark.line + 1}: 'guests' must be a list")
    errors: list[str] = []
    seen: dict[int, int] = {}
    declared = []
    for item in guests_node.value:
        guest = _guest(item, name, errors)
        if guest is None:
            continue
        line = item.start_mark.line + 1
        if guest.vmid in seen:
            errors.append(f"{name}:{line}: vmid: duplicate vmid {guest.vmid} (first at line {seen[guest.vmid]})")
        seen[guest.vmid] = line
        declared.append(guest)
    if errors:
        raise DesiredFileError("\n".join(errors))
    return declared


def check_types(declared: Iterable[Declared], types: Mapping[int, str]) -> None:
    """Each declared config against the schema of the guest's type as the node reports it (``types``: vmid to
    qemu or lxc); DesiredFileError naming file and line of every key the guest's type does not take."""
    errors = []
    for guest in declared:
        guest_type = types.get(guest.vmid)
        if guest_type is None or guest.config is None:
            continue
        for key, value in guest.config.items():
            problem = configschema.key_problem((guest_type,), key, value)
            if problem is not None:
                where = guest.lines.get(f"config.{key}", guest.lines.get("vmid", 0))
                errors.append(f"{guest.origin}:{where}: config.{key}: {problem} (guest {guest.vmid} is {guest_type})")
    if errors:
        raise DesiredFileError("\n".join(errors))


def _where(name: str, node: yaml.Node, field_name: str) -> str:
    return f"{name}:{node.start_mark.line + 1}: {field_name}"


def _guest(node: yaml.Node, name: str, errors: list[str]) -> Declared | None:
    """One guest entry; its mistakes are added to ``errors`` (None when it cannot be read at all)."""
    if not isinstance(node, yaml.MappingNode):
        errors.append(f"{_where(name, node, 'guest')}: each guest must be a mapping")
        return None
    fields: dict[str, yaml.Node] = {}
    for key, value in node.value:
        if key.value not in GUEST_KEYS:
            close = difflib.get_close_matches(str(key.value), sorted(GUEST_KEYS), n=1)
            expected = ", ".join(sorted(GUEST_KEYS))
            errors.append(f"{_where(name, key, key.value)}: unknown key (expected one of {expected})"
                          + (f"; did you mean `{close[0]}`?" if close else ""))
            continue
        if key.value in fields:  # one reading only: YAML's last-wins is not what a reviewer reads
            errors.append(f"{_where(name, key, key.value)}: declared twice (first at line "
                          f"{fields[key.value].start_mark.line + 1})")
            continue
        fields[key.value] = value
    vmid = _vmid(node, fields.get("vmid"), name, errors)
    lines = {"vmid": node.start_mark.line + 1}
    state = _guarded(errors, lambda: _state(fields.get("state"), name))
    config = _config(fields.get("config"), name, errors, lines)
    description = _guarded(errors, lambda: _description(fields.get("description"), name))
    if vmid is None:
        return None
    return Declared(vmid=vmid, state=state, config=config, description=description, lines=lines, origin=name)


def _guarded(errors: list[str], read: Callable[[], str | None]) -> str | None:
    """``read()``; its DesiredFileError is added to ``errors`` (and None returned)."""
    try:
        return read()
    except DesiredFileError as exc:
        errors.append(str(exc))
        return None


def _vmid(node: yaml.Node, vmid_node: yaml.Node | None, name: str, errors: list[str]) -> int | None:
    if vmid_node is None:
        errors.append(f"{_where(name, node, 'vmid')}: required")
        return None
    if not (isinstance(vmid_node, yaml.ScalarNode) and vmid_node.tag.endswith(":int")):
        errors.append(f"{_where(name, vmid_node, 'vmid')}: must be an integer, got {vmid_node.value!r}")
        return None
    if not _DECIMAL.fullmatch(vmid_node.value):  # YAML 1.1 also tags 0x64, 1:40 int, int() refuses them
        errors.append(f"{_where(name, vmid_node, 'vmid')}: must be a decimal integer, got {vmid_node.value[:20]!r}")
        return None
    vmid = int(vmid_node.value)
    if not 100 <= vmid <= 999_999_999:
        errors.append(f"{_where(name, vmid_node, 'vmid')}: must be 100..999999999, got {vmid}")
        return None
    return vmid


def _state(node: yaml.Node | None, name: str) -> str | None:
    if node is None:
        return None
    if not isinstance(node, yaml.ScalarNode) or node.value not in STATES:
        raise DesiredFileError(f"{_where(name, node, 'state')}: must be running or stopped, got {node.value!r}")
    return str(node.value)


def _config(node: yaml.Node | None, name: str, errors: list[str], lines: dict[str, int]) -> dict[str, str] | None:
    """The config mapping, each key and value checked against PVE's schema; mistakes go to ``errors``."""
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        errors.append(f"{_where(name, node, 'config')}: must be a mapping of PVE keys to values")
        return None
    config: dict[str, str] = {}
    for key, value in node.value:
        field_name = "config." + str(key.value)
        if not _KEY.fullmatch(str(key.value)):
            errors.append(f"{_where(name, key, field_name)}: not a PVE config key (a lowercase letter, "
                          "then [a-z0-9_-])")
            continue
        if not isinstance(value, yaml.ScalarNode):
            errors.append(f"{_where(name, value, field_name)}: must be a single value")
            continue
        if key.value in config:
            errors.append(f"{_where(name, key, field_name)}: declared twice (first at line {lines[field_name]})")
            continue
        text = _scalar(value)
        problem = configschema.key_problem(configschema.GUEST_TYPES, key.value, text)
        if problem is not None:
            errors.append(f"{_where(name, key, field_name)}: {problem}")
        config[key.value] = text
        lines[field_name] = key.start_mark.line + 1
    return config


def _scalar(node: yaml.ScalarNode) -> str:
    """A YAML scalar as PVE text: booleans as 1/0 (PVE refuses True), null as blank (delete)."""
    if node.tag.endswith(":bool"):
        return "1" if node.value.lower() in ("true", "yes", "on") else "0"
    if node.tag.endswith(":null"):
        return ""
    return str(node.value)


def _description(node: yaml.Node | None, name: str) -> str | None:
    if node is None:
        return None
    if not isinstance(node, yaml.ScalarNode):
        raise DesiredFileError(f"{_where(name, node, 'description')}: must be text")
    text = str(node.value)
    if "\x00" in text or len(text) > DESCRIPTION_MAX:  # what the planner would refuse, said with the line
        raise DesiredFileError(f"{_where(name, node, 'description')}: holds a NUL or is longer than PVE's "
                                f"{DESCRIPTION_MAX} characters")
    return text
