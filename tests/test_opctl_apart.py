"""The operator's tool runs without the daemon: opctl with the daemon's modules, the journal and proxmoxer blocked.

A fresh interpreter installs an import hook that refuses them, then runs ``keys generate`` and
``op sign`` (and ``trust check``) through ``opctl``; it fails if any of them is imported, directly or not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from executor.config import DEFAULT_LISTEN
from opctl.cli import DEFAULT_API
from safety import challenge
from safety.payload import action_of
from tests.signing import AUDIENCE, DIGEST, SECRET, default_roles, to_toml, write_store

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("executor.app", "executor.api", "executor.signed", "executor.loop", "executor.gate", "executor.pve",
           "executor.cli", "executor.config", "executor.metrics", "journal", "proxmoxer", "planner")
RUNNER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = tuple(sys.argv[1].split(","))


class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {name}")
        return None


sys.meta_path.insert(0, Block())
from opctl.cli import run

code = run(sys.argv[2:])
loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
assert not loaded, loaded
sys.exit(code)
"""


def opctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``opctl ARGS`` in a fresh interpreter where the daemon's modules cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(BLOCKED), *args], cwd=cwd, env=env, input="",
                          capture_output=True, text=True, timeout=60, check=False, start_new_session=True)


def test_keys_generate_trust_check_and_op_sign_run_without_the_daemon(tmp_path: Path) -> None:
    """keys generate, trust check and op sign succeed with the daemon, journal and proxmoxer unimportable."""
    made = opctl("keys", "generate", "--out", "alice.key", "--owner", "alice@example.org",
                 "--not-after", "2030-01-01", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    entry = made.stdout.replace("roles = []", 'roles = ["destroyer"]')
    trust = write_store(tmp_path, "\n".join([to_toml({"version": 1, "roles": default_roles()}), entry]))
    checked = opctl("trust", "check", str(trust), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    action = action_of(audience=AUDIENCE, vmid=105, guest_type="qemu", kind="guest.destroy",
                       params={"purge": True, "destroy_unreferenced_disks": False}, class_="DESTRUCTIVE",
                       digest=DIGEST, run_state="stopped")
    proposal = {"action": action, "challenge": challenge.issue(SECRET, action, now=time.time()),
                "class": "DESTRUCTIVE", "rule": "kind:guest.destroy", "reasons": ["test"], "before": {}}
    (tmp_path / "d.json").write_text(json.dumps(proposal), encoding="utf-8")
    signed = opctl("op", "sign", "--key", "alice.key", "--role", "destroyer", "--yes", "--out", "d.op", "d.json",
                   cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert json.loads((tmp_path / "d.op").read_text(encoding="utf-8"))["signatures"]


def test_the_tool_and_the_daemon_default_to_the_same_socket() -> None:
    """opctl's default API address is the daemon's default listen address (written twice, kept equal here)."""
    assert DEFAULT_API == DEFAULT_LISTEN
