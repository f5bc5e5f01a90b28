"""The README's approvals how-to, run as written (issue 15): every command line of its marked blocks.

The blocks marked ``<!-- howto:approvals -->`` are extracted from README.md and each command line is
run by bash, one after the other, in a temporary HOME, from the repository (the how-to says "in the
clone"), against a real executor daemon over fakepve over HTTPS and a real planner. The node's setup
that the quick start makes (executor.toml, the desired file, the service) is the test's: it writes an
executor.toml for fakepve, and ``systemctl`` on PATH is a stand-in that (re)starts ``pve-executor run``
as a process, as systemd would. The only substitutions: /etc/pve-reconcile and /run/pve-reconcile are
and /var/lib/pve-reconcile are directories of the test, and OP_ID is the id ``op submit`` printed. A
line that sets a shell variable (``AUDIENCE=$(...)``) is run and the variable kept for the lines after it.
The operator commands find the API as the README says: through the config's ``listen``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planner import server
from tests.signed_helpers import add_vm

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- howto:approvals -->"
BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.+)$")
ACCEPTED = re.compile(r"^(?:accepted: |op )([0-9a-f]{32}) \(", re.MULTILINE)

SYSTEMCTL = """#!{python}
\"\"\"systemctl, as far as the how-to uses it: restart, reload or stop pve-reconcile-executor (a process here).\"\"\"
import os, signal, subprocess, sys, time
PIDFILE, LOG = {pidfile!r}, {log!r}

def running():
    try:
        pid = int(open(PIDFILE).read())
        state = open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ValueError):
        return None
    return pid if state != "Z" else None

def stop():
    pid = running()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(600):
        if running() is None:
            return
        time.sleep(0.05)
    sys.exit("the executor did not stop")

def start():
    with open(LOG, "ab") as log:
        child = subprocess.Popen(["pve-executor", "run"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
    open(PIDFILE, "w").write(str(child.pid))

verb, unit = sys.argv[1], sys.argv[2].removesuffix(".service")
if unit != "pve-reconcile-executor":
    sys.exit(f"systemctl stand-in: unknown unit {{unit}}")
if verb == "restart":
    stop()
    start()
elif verb == "reload":
    os.kill(running(), signal.SIGHUP)
elif verb == "stop":
    stop()
else:
    sys.exit(f"systemctl stand-in: unknown verb {{verb}}")
"""


def howto_lines(text: str) -> list[str]:
    """The command lines of the marked ``sh`` blocks, in order (comments and blank lines left out)."""
    lines: list[str] = []
    for part in text.split(MARK)[1:]:
        block = BLOCK.match(part.lstrip("\n"))
        assert block is not None, f"{MARK} is not followed by a ```sh block"
        joined = block.group(1).replace("\\\n", " ")
        lines += [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def test_the_howto_blocks_are_found() -> None:
    """The marks are there and hold the commands the test relies on (a renamed mark fails here, not silently)."""
    lines = howto_lines(README.read_text(encoding="utf-8"))
    words = " ".join(lines)
    for needed in ("keys generate", "trust check", "systemctl restart", "op propose", "op sign", "op cosign",
                   "op submit --wait", "whoami --json"):
        assert needed in words, f"the how-to has no {needed!r}"


def test_the_readme_starts_with_what_a_newcomer_needs() -> None:
    """Its first 60 lines say what it is, the two commands and where to go next; it stays short (docs/ has depth)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    top = "\n".join(lines[:60])
    for needed in ("make demo", "make test", "## Where to go next", "#install", "#approvals-step-by-step",
                   "docs/ARCHITECTURE.md"):
        assert needed in top, needed
    assert len(lines) <= 400


@pytest.fixture(name="short_dir")
def _short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path is limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pr-howto-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _node(fakepve: Any) -> None:
    """The guests of deploy/desired.example.yaml, and guest 104 with a second disk to detach."""
    add_vm(fakepve, 100, disks=1, net0="virtio=BC:24:11:00:01:00,bridge=vmbr0,firewall=1", memory=2048)
    fakepve.add_ct(101, "ct101", status="running", config={"memory": 512, "hostname": "ct101"})
    add_vm(fakepve, 102, disks=1, balloon=1024)
    add_vm(fakepve, 104, disks=2)


def _tools(bin_dir: Path, run_dir: Path) -> None:
    """pve-executor and pve-healthcheck as installed (this checkout's code), and the systemctl stand-in."""
    bin_dir.mkdir()
    for name, module in (("pve-executor", "executor"), ("pve-healthcheck", "common.healthcheck")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n', encoding="utf-8")
    (bin_dir / "systemctl").write_text(SYSTEMCTL.format(python=sys.executable, pidfile=str(run_dir / "executor.pid"),
                                                        log=str(run_dir / "executor.log")), encoding="utf-8")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def _settings(etc: Path, fakepve: Any, cafile: str, planner: server.Running, state: Path, run_dir: Path) -> None:
    """What the quick start leaves in /etc/pve-reconcile: executor.toml (for fakepve) and the example desired file."""
    etc.mkdir(parents=True)
    (etc / "password").write_text("secret\n", encoding="utf-8")
    (etc / "password").chmod(0o600)
    shutil.copy(ROOT / "deploy" / "desired.example.yaml", etc / "desired.yaml")
    (etc / "desired.yaml").chmod(0o644)
    (etc / "executor.toml").write_text(
        f'node = "pve1"\npve_url = "https://127.0.0.1:{fakepve.port}"\npve_user = "root@pam"\n'
        f'pve_password_file = "{etc / "password"}"\npve_ca_file = "{cafile}"\n'
        f'planner = "127.0.0.1:{planner.port}"\ndesired = "{etc / "desired.yaml"}"\nstate_dir = "{state}"\n'
        f'listen = "unix:{run_dir / "executor.sock"}"\nlog_format = "json"\n', encoding="utf-8")


def _environment(home: Path, bin_dir: Path, etc: Path, run_dir: Path) -> dict[str, str]:
    """The operator's shell: a fresh HOME, the tools on PATH, the config and the API named by the environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVE_PLANNER_", "PVE_EXECUTOR_", "PVE_HEALTH"))}
    return {**clean, "HOME": str(home), "PATH": f"{bin_dir}:{clean.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(ROOT), "PVE_EXECUTOR_CONFIG": str(etc / "executor.toml")}


def _stop_daemon(run_dir: Path) -> None:
    """SIGTERM the executor the systemctl stand-in started (by its recorded PID), and wait for it."""
    pidfile = run_dir / "executor.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text(encoding="utf-8"))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return
        time.sleep(0.05)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def _detaches(fakepve: Any) -> list[str]:
    """The ``delete`` of every config write of guest 104 Proxmox received."""
    return [dict(urllib.parse.parse_qsl(body.decode())).get("delete", "") for method, path, body in fakepve.requests
            if method in ("POST", "PUT") and path.endswith("/qemu/104/config")]


def _converged(fakepve: Any) -> tuple[bool, str]:
    """Whether guest 100 has the example's memory, and guest 101's power state."""
    return str(fakepve.vm(100).config.get("memory")) == "4096", fakepve.guest(101).status


def _undo_as_written(env: dict[str, str], op_id: str) -> None:
    """The README's ``op undo`` line (after the how-to) proposes the re-attach: a kind the trust example grants."""
    text = README.read_text(encoding="utf-8")
    (line,) = [line for line in text.splitlines() if line.startswith("pve-executor op undo")]
    result = subprocess.run(["bash", "-c", line.replace("OP_ID", op_id)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    undo = json.loads((Path(env["HOME"]) / ".pve-reconcile" / "undo.json").read_text(encoding="utf-8"))
    assert (undo["action"]["kind"], undo["action"]["params"]["set"]) == (
        "config.disk_attach", {"scsi1": "local-lvm:vm-104-disk-1,size=4G"})


def test_the_readme_approvals_howto_runs_as_written(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                    tmp_path: Path, short_dir: Path) -> None:
    """Keys, the trust store from deploy/trust.example.toml, a restart, then propose, sign, cosign, submit:
    Proxmox receives the detach of scsi1 exactly once."""
    _node(fakepve)
    home, bin_dir, etc = tmp_path / "home", tmp_path / "bin", tmp_path / "etc" / "pve-reconcile"
    home.mkdir()
    _tools(bin_dir, short_dir)
    _settings(etc, fakepve, fakepve_cafile, planner, tmp_path / "state", short_dir)
    env = _environment(home, bin_dir, etc, short_dir)
    op_id = ""
    try:
        # The quick start's end state: the service runs, without a trust store (signed ops off).
        subprocess.run(["systemctl", "restart", "pve-reconcile-executor"], env=env, check=True, timeout=60)
        for line in howto_lines(README.read_text(encoding="utf-8")):
            command = (line.replace("/etc/pve-reconcile", str(etc)).replace("/run/pve-reconcile", str(short_dir))
                       .replace("/var/lib/pve-reconcile", str(tmp_path / "state")))
            if "OP_ID" in command:
                assert op_id, f"{line!r}: no op was accepted before it"
                command = command.replace("OP_ID", op_id)
            assigned = ASSIGNMENT.match(command)
            if assigned:  # the shell's variable, kept for the next lines
                command += f'\nprintf %s "${assigned.group(1)}"'
            result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=120, check=False)
            assert result.returncode == 0, f"README: {line}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
            if assigned:
                env[assigned.group(1)] = result.stdout
                assert result.stdout, f"README: {line}: sets nothing"
            found = ACCEPTED.search(result.stdout)
            op_id = found.group(1) if found else op_id
        assert op_id, "the how-to never got an op accepted"
        deadline = time.monotonic() + 30
        while "scsi1" in fakepve.vm(104).config and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "scsi1" not in fakepve.vm(104).config
        assert _detaches(fakepve) == ["scsi1"]
        _undo_as_written(env, op_id)
        # The daemon converged the guests of deploy/desired.example.yaml meanwhile (the example works as shipped).
        deadline = time.monotonic() + 30
        while _converged(fakepve) != (True, "stopped") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _converged(fakepve) == (True, "stopped")
    finally:
        _stop_daemon(short_dir)
