"""Write safety/pvegrammar_data.py, PVE's config grammar, from PVE's own API schema.

The schema is the apidoc that the pve-docs API viewer serves (``apidoc.js``); fakepve, a test
dependency, ships a copy of it (``fakepve/data/pve-api.json.gz``), so this script runs offline.
The generated module is checked in and reviewed like code; ``--check`` fails when it is stale
(``tests/test_pve_grammar.py`` runs it).

What the schema gives: every config key of QEMU (``POST .../qemu/{vmid}/config``) and LXC
(``PUT .../lxc/{vmid}/config``), the keys GET returns that no write takes (``vmstate``,
``runningmachine``...), and, per property-string key, its ``format``: fields with ``default_key``,
``alias``/``keyAlias``, ``enum``, ``pattern``, ``default``, ``optional``. What it does not give: the
named formats PVE registers in code (``pve-qm-ipconfig``, ``pve-vm-cpu-conf``...). Those are below,
from qemu-server's sources, and marked ``open`` where we know only their default key: an open format
takes any field name (duplicates are still refused).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import pprint
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "safety" / "pvegrammar_data.py"

ENDPOINTS = {"qemu": ("/nodes/{node}/qemu/{vmid}/config", "POST"), "lxc": ("/nodes/{node}/lxc/{vmid}/config", "PUT")}
FIELD_ATTRS = ("type", "enum", "pattern", "default", "default_key", "alias", "keyAlias", "optional", "requires",
               "format", "minimum", "maximum")

# Named formats PVE registers in code; the schema only names them (qemu-server QemuServer.pm,
# CPUConfig.pm, PCI.pm, Cloudinit.pm, pve-common JSONSchema.pm).
NAMED: dict[str, dict[str, dict[str, Any]]] = {
    "pve-qm-ipconfig": {
        "ip": {"type": "string", "optional": 1, "default": "dhcp"},
        "gw": {"type": "string", "optional": 1, "requires": "ip"},
        "ip6": {"type": "string", "optional": 1, "default": "dhcp"},
        "gw6": {"type": "string", "optional": 1, "requires": "ip6"},
    },
    "pve-qm-boot": {
        "legacy": {"type": "string", "optional": 1, "default_key": 1, "pattern": "[acdn]{1,4}"},
        "order": {"type": "string", "optional": 1},
    },
    "pve-qm-rng": {
        "source": {"type": "string", "enum": ["/dev/urandom", "/dev/random", "/dev/hwrng"], "default_key": 1},
        "max_bytes": {"type": "integer", "optional": 1, "default": 1024},
        "period": {"type": "integer", "optional": 1, "default": 1000},
    },
    "pve-qm-watchdog": {
        "model": {"type": "string", "enum": ["i6300esb", "ib700"], "default_key": 1, "optional": 1},
        "action": {"type": "string", "enum": ["reset", "shutdown", "poweroff", "pause", "debug", "none"],
                   "optional": 1},
    },
    "pve-qm-smbios1": {name: {"type": "string", "optional": 1} for name in (
        "uuid", "manufacturer", "product", "version", "serial", "sku", "family")} | {
        "base64": {"type": "boolean", "optional": 1}},
    "pve-qm-cicustom": {name: {"type": "string", "optional": 1} for name in ("meta", "network", "user", "vendor")},
    "pve-startup-order": {
        "order": {"type": "integer", "optional": 1, "default_key": 1, "minimum": 0},
        "up": {"type": "integer", "optional": 1, "minimum": 0},
        "down": {"type": "integer", "optional": 1, "minimum": 0},
    },
    # Open: the default key is known, the rest of the fields are PVE's (CPU flags, PCI ids, SEV policy bits).
    "pve-vm-cpu-conf": {"cputype": {"type": "string", "optional": 1, "default_key": 1}},
    "pve-qm-hostpci": {"host": {"type": "string", "optional": 1, "default_key": 1}},
    "pve-qemu-sev-fmt": {"type": {"type": "string", "optional": 1, "default_key": 1}},
    "pve-qemu-tdx-fmt": {"type": {"type": "string", "optional": 1, "default_key": 1}},
}
OPEN = frozenset({"pve-vm-cpu-conf", "pve-qm-hostpci", "pve-qemu-sev-fmt", "pve-qemu-tdx-fmt"})
# Keys a config write takes that are no config: the write's own arguments (PVE also returns ``digest``
# with a read, as the version a write may be conditioned on). A desired file may not declare them.
PARAMETERS = frozenset({"digest"})
KEY_ATTRS = ("minimum", "maximum", "maxLength")  # a key's range, checked before anything is planned
# A named format that is another key's inline one: cdrom is PVE's alias of ide2.
SAME_AS = {"pve-qm-ide": "qemu:ide[n]"}


def load_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """The apidoc's paths and its provenance, from the copy fakepve ships."""
    data = importlib.resources.files("fakepve") / "data"
    paths = json.loads(gzip.decompress((data / "pve-api.json.gz").read_bytes()))["paths"]
    meta = json.loads((data / "pve-api.meta.json").read_text())
    return paths, meta


def python_pattern(perl: str) -> str | None:
    """A PVE (Perl) pattern as a Python regex source; None when Python cannot take it."""
    source = re.sub(r"\(\?\^[a-z]*:", "(?:", perl)
    try:
        re.compile(source)
    except re.error:
        return None
    return source


def field_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The attributes of one property-string field that parsing needs."""
    out: dict[str, Any] = {}
    for attr in FIELD_ATTRS:
        if attr not in spec:
            continue
        value = spec[attr]
        if attr == "format" and not isinstance(value, str):
            continue
        if attr == "pattern":
            value = python_pattern(value)
            if value is None:
                continue
        out[attr] = value
    return out


def key_entry(guest_type: str, key: str, spec: dict[str, Any], formats: dict[str, Any], *,
              writable: bool, parameter: bool = False) -> dict[str, Any]:
    """One config key: its type, range, enum or pattern, the format its value is parsed with, writable or not,
    and whether it is a parameter of the write rather than a config key."""
    entry: dict[str, Any] = {"type": spec.get("type", "string"), "writable": writable}
    entry.update({attr: spec[attr] for attr in KEY_ATTRS if attr in spec})
    if parameter:
        entry["parameter"] = True
    fmt = spec.get("format")
    if isinstance(fmt, dict):
        fields = {field: field_spec(sub) for field, sub in sorted(fmt.items())}
        # Keys of one format share one entry (QEMU's ide, sata, scsi and virtio drives are one grammar).
        name = next((known for known, other in formats.items() if other == fields), f"{guest_type}:{key}")
        formats[name] = fields
        entry["format"] = name
    elif isinstance(fmt, str) and (fmt in NAMED or fmt in SAME_AS):
        entry["format"] = SAME_AS.get(fmt, fmt)
    elif isinstance(fmt, str):
        entry["value_format"] = fmt
    if "enum" in spec:
        entry["enum"] = spec["enum"]
    if "pattern" in spec and python_pattern(spec["pattern"]) is not None:
        entry["pattern"] = python_pattern(spec["pattern"])
    return entry


def grammar() -> dict[str, Any]:
    """Keys per guest type and every format they use, from the schema and ``NAMED``."""
    paths, meta = load_schema()
    formats: dict[str, Any] = {name: dict(sorted(fields.items())) for name, fields in NAMED.items()}
    keys: dict[str, dict[str, Any]] = {}
    for guest_type, (path, method) in ENDPOINTS.items():
        written = paths[path][method]["parameters"]["properties"]
        returned = paths[path]["GET"]["returns"].get("properties", {})
        found = {key: key_entry(guest_type, key, spec, formats, writable=True,
                                parameter=key not in returned or key in PARAMETERS)
                 for key, spec in written.items()}
        for key, spec in returned.items():
            if key not in found:
                found[key] = key_entry(guest_type, key, spec, formats, writable=False)
        keys[guest_type] = dict(sorted(found.items()))
    return {"source": meta, "formats": dict(sorted(formats.items())), "open": sorted(OPEN), "keys": keys}


def render(data: dict[str, Any]) -> str:
    """The generated module's text."""
    body = pprint.pformat
    return (
        '"""PVE\'s config grammar: keys and property-string formats. GENERATED by scripts/gen_pve_grammar.py.\n\n'
        "Do not edit: change the script (or PVE's schema) and run it again. Read by ``safety.grammar``.\n"
        '"""\n\n'
        "from typing import Any\n\n"
        f"SOURCE: dict[str, Any] = {body(data['source'], width=110, sort_dicts=True)}\n\n"
        f"FORMATS: dict[str, dict[str, dict[str, Any]]] = {body(data['formats'], width=110, sort_dicts=True)}\n\n"
        f"OPEN: frozenset[str] = frozenset({body(data['open'], width=110)})\n\n"
        f"KEYS: dict[str, dict[str, dict[str, Any]]] = {body(data['keys'], width=110, sort_dicts=True)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Write the module, or with ``--check`` exit 1 when the checked-in one differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when safety/pvegrammar_data.py is stale")
    args = parser.parse_args(argv)
    text = render(grammar())
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/gen_pve_grammar.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
