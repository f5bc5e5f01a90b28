"""The shipped examples pass their own checks (issue 15): deploy/trust.example.toml and deploy/desired.example.yaml."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from executor.loop.desired import FileProvider
from safety import grammar, opschema
from safety.classify import KIND_RULES

ROOT = Path(__file__).resolve().parent.parent
TRUST = ROOT / "deploy" / "trust.example.toml"
DESIRED = ROOT / "deploy" / "desired.example.yaml"
# What an operator needs: every DESTRUCTIVE op the executor runs, a veto, the undo of a detach, a MAC change.
NEEDED = {"config.disk_detach", "config.unused_delete", "guest.destroy", "snapshot.delete", "snapshot.rollback",
          "op.revoke", "config.disk_attach", "config.nic_identity", "config.protection_off"}


def test_trust_check_accepts_the_trust_example() -> None:
    """``pve-executor trust check deploy/trust.example.toml`` exits 0 and lists both roles."""
    result = subprocess.run([sys.executable, "-m", "executor", "trust", "check", str(TRUST)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "role destroyer:" in result.stdout and "role operator:" in result.stdout


def test_the_trust_example_covers_what_an_operator_needs() -> None:
    """Every kind in NEEDED is in a role whose classes hold the kind's class; audiences are NODE@CLUSTER."""
    roles = tomllib.loads(TRUST.read_text(encoding="utf-8"))["roles"]
    granted = {kind for role in roles for kind in role["kinds"] if KIND_RULES[kind].cls.name in role["classes"]}
    assert granted >= NEEDED, sorted(NEEDED - granted)
    for role in roles:
        for audience in role["audiences"]:
            assert re.fullmatch(r"[\w.-]+@[\w.-]+", audience) and opschema.AUDIENCE.fullmatch(audience), audience


def test_the_desired_example_loads_and_names_real_pve_keys(tmp_path: Path) -> None:
    """The executor's loader reads the example; every config key is one of PVE's for some guest type."""
    copy = tmp_path / "desired.yaml"
    copy.write_text(DESIRED.read_text(encoding="utf-8"), encoding="utf-8")
    guests = FileProvider(copy).desired()
    assert [g.vmid for g in guests] == [100, 101, 102]
    for guest in guests:
        for key in guest.config or {}:
            assert any(grammar.key_spec(t, key) is not None for t in ("qemu", "lxc")), key
