"""Findings on the daemon's start and its operator-facing errors, as real processes against fakepve and a planner.

A SIGHUP (``systemctl reload``) while the daemon starts is kept, never fatal; a CA, certificate or key that
does not load, and a state directory the trust store's floor cannot be written to, are configuration errors
(exit 2) naming the setting and the file; a planner client key is named by its own flag; a desired file's
mistakes are printed a line each, every line prefixed; a key the guest's type does not take is the desired
file's mistake (file:line) in ``run`` as in ``plan``, never a gate refusal; the executor benchmark leaves no
directory behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from common.config import ConfigError
from executor.app.connect import planner_tls
from executor.config import ExecutorSettings
from executor.loop.planner_client import PlannerClient
from planner import server
from tests.certs import make_pki
from tests.executor_helpers import ROOT, cli, run_module, unused_port
from tests.signed_helpers import Daemon, add_vm, run_command
from tests.signed_helpers import store_doc as trust_doc
from tests.signing import write_store
from tests.tmpfs import tiny_filesystem


def _run(command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _once(fakepve: Any, cafile: str, planner: server.Running, tmp_path: Path, *extra: str) -> list[str]:
    """``pve-executor run --once`` against the fixtures, state in tmp_path/state."""
    return [*cli(f"https://127.0.0.1:{fakepve.port}", cafile, f"127.0.0.1:{planner.port}", tmp_path, "run",
                 "--once", "--state-dir", str(tmp_path / "state")), *extra]


def _writes(fakepve: Any, since: int) -> list[tuple[str, str]]:
    """The POST/PUT/DELETE requests fakepve received since ``since`` (a login's ticket is not a write)."""
    return [(m, p) for m, p, _ in fakepve.requests[since:] if m in ("POST", "PUT", "DELETE") and "ticket" not in p]


# --- 1. SIGHUP during start-up ------------------------------------------------------------------------------

def _open_writer(fifo: Path, daemon: Daemon, timeout: float = 30.0) -> int:
    """The FIFO's write end, once the daemon opened its read end (ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        assert daemon.child.poll() is None, f"the daemon exited {daemon.child.returncode}"
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        assert time.monotonic() < deadline, "the daemon never opened its desired file"
        time.sleep(0.02)


def test_a_sighup_while_the_daemon_starts_is_kept_and_reloads_once_it_runs(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """The window held open: the desired file is a FIFO the daemon reads at start (before the journal, the
    build and the API) and the test writes only after its SIGHUP. The daemon lives on (Python's default
    for SIGHUP ends the process), serves, and reloads the trust store for that SIGHUP."""
    add_vm(fakepve, 100, status="running")
    fifo = tmp_path / "desired.yaml"
    os.mkfifo(fifo)
    with Daemon(run_command(fakepve, fakepve_cafile, planner.port, tmp_path, "--desired", str(fifo)),
                unused_port()) as daemon:
        writer = _open_writer(fifo, daemon)
        try:
            daemon.child.send_signal(signal.SIGHUP)  # the daemon waits in its desired file's read: mid start-up
            time.sleep(0.5)
            assert daemon.child.poll() is None, f"a SIGHUP during start-up ended the daemon ({daemon.child.returncode})"
            os.write(writer, b"guests: []\n")
            plain = tmp_path / "desired.next"
            plain.write_text("guests: []\n", encoding="utf-8")
            os.replace(plain, fifo)  # the next read (a tick's) finds a plain file, not a FIFO that would wait
        finally:
            os.close(writer)
        daemon.wait_serving()
        reloads = daemon.events("trust_store_reload")
        assert daemon.stop() == 0
    assert [e.get("cause") for e in reloads] == ["SIGHUP"]


# --- 2. CA, certificate and key files that do not load -------------------------------------------------------

def test_a_pve_ca_file_that_is_not_pem_is_a_config_error_at_start(fakepve: Any, planner: server.Running,
                                                                   tmp_path: Path) -> None:
    """Not "no answer from 127.0.0.1: SSLError" at tick time: exit 2 naming pve_ca_file and the file."""
    add_vm(fakepve, 100, status="running")
    garbage = tmp_path / "pve-ca.pem"
    garbage.write_text("this is not a certificate\n", encoding="utf-8")
    before = len(fakepve.requests)
    result = _run(_once(fakepve, str(garbage), planner, tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"pve-executor: config: pve_ca_file: {garbage}: not a PEM CA certificate (" in result.stderr
    assert "Traceback" not in result.stderr and len(fakepve.requests) == before


# Python itself is root's (under /root): the child starts as root, imports what it runs, then drops to nobody.
AS_NOBODY = """
import os, sys
import executor.app.connect, executor.app.daemon, executor.cli
os.setgroups([]); os.setgid(65534); os.setuid(65534)
sys.exit(executor.cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to")
def test_a_pve_ca_file_the_service_user_may_not_read_is_a_config_error_naming_why(
        fakepve: Any, fakepve_cafile: str, planner: server.Running) -> None:
    """The CA is root's, 0600, and the daemon runs as another user: exit 2 with "Permission denied", not
    "no such file" and not an SSLError at tick time."""
    folder = Path(tempfile.mkdtemp(prefix="pve-ca-test-", dir="/tmp"))  # tmp_path's parents are root's 0700
    try:
        folder.chmod(0o755)
        ca = folder / "pve-ca.pem"
        shutil.copy(fakepve_cafile, ca)
        ca.chmod(0o600)
        command = [sys.executable, "-c", AS_NOBODY, "run", "--once", "--node", "pve1", "--pve-url",
                   f"https://127.0.0.1:{fakepve.port}", "--pve-user", "root@pam", "--pve-ca-file", str(ca),
                   "--planner", f"127.0.0.1:{planner.port}", "--state-dir", str(folder / "state")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PVE_EXECUTOR_")}
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                                env={**env, "PVE_EXECUTOR_PVE_PASSWORD": "secret"})
    finally:
        shutil.rmtree(folder)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"pve-executor: config: pve_ca_file: cannot read {ca}: Permission denied" in result.stderr


@pytest.mark.parametrize(("setting", "problem"), [
    ("tls_cert", "(tls_cert) and {key} (tls_key) do not load as a PEM certificate and its key"),
    ("tls_key", "(tls_cert) and {key} (tls_key) do not load as a PEM certificate and its key"),
    ("tls_client_ca", "{garbage}: not a PEM CA certificate ("),
    ("mismatch", "{key} is not the key of {cert}: give tls_cert and tls_key from one pair"),
])
def test_api_tls_files_that_do_not_load_are_a_config_error_at_start(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path, setting: str,
        problem: str) -> None:
    """The API's certificate, key or client CA not PEM, or a key of another certificate: exit 2 at start naming
    the setting and the file, before anything is read from Proxmox."""
    pki = make_pki(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n", encoding="utf-8")
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    if setting == "mismatch":
        files["tls_key"] = pki.client_key
    else:
        files[setting] = str(garbage)
    before = len(fakepve.requests)
    result = _run([*run_command(fakepve, fakepve_cafile, planner.port, tmp_path), "--listen",
                   f"127.0.0.1:{unused_port()}", "--tls-cert", files["tls_cert"], "--tls-key", files["tls_key"],
                   "--tls-client-ca", files["tls_client_ca"]], timeout=30)
    assert result.returncode == 2, result.stderr[-2000:]
    named = "tls_client_ca" if setting == "tls_client_ca" else "tls_key"
    expected = problem.format(key=files["tls_key"], cert=files["tls_cert"], garbage=garbage)
    assert f"pve-executor: config: {named}: " in result.stderr and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(fakepve.requests) == before


# --- 3. trust store set, state directory not writable ------------------------------------------------------

def test_an_unwritable_state_dir_with_a_trust_store_is_a_config_error(fakepve: Any, fakepve_cafile: str,
                                                                      planner: server.Running,
                                                                      tmp_path: Path) -> None:
    """The trust store's floor (trust.version) cannot be kept: exit 2 naming the directory, no traceback."""
    trust = write_store(tmp_path, trust_doc(), name="trust-daemon.toml")
    with tiny_filesystem(tmp_path, "64k", read_only=True) as state:
        result = _run([*_once(fakepve, fakepve_cafile, planner, tmp_path), "--state-dir", str(state),
                       "--trust-store", str(trust)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"pve-executor: config: state_dir: {state}: cannot write trust.version (Read-only file system): the "
            "trust store's last accepted version is kept there; give a writable --state-dir") in result.stderr
    assert "Traceback" not in result.stderr


# --- 4. a client key named by its own flag --------------------------------------------------------------------

def test_a_planner_client_key_that_cannot_be_read_is_named_planner_client_key(tmp_path: Path) -> None:
    """Read again when the channel is made (after the start's check): still named planner_client_key."""
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "client.key"
    shutil.copy(pki.client_key, key)
    settings = ExecutorSettings(planner="127.0.0.1:1", planner_ca=pki.ca, planner_client_cert=pki.client_cert,
                                planner_client_key=str(key))
    tls = planner_tls(settings)
    assert tls is not None
    key.unlink()
    with pytest.raises(ConfigError) as raised:
        PlannerClient(settings.planner, tls=tls)
    assert raised.value.key == "planner_client_key"


def test_pve_healthcheck_names_its_own_client_key_flag(tmp_path: Path) -> None:
    """pve-healthcheck --client-key MISSING: `client_key`, the flag it was given as (exit 2)."""
    pki = make_pki(tmp_path / "pki")
    missing = tmp_path / "missing.key"
    result = run_module("common.healthcheck", "--client-cert", pki.client_cert, "--client-key", str(missing),
                        f"127.0.0.1:{unused_port()}")
    assert result.returncode == 2
    assert f"pve-healthcheck: config: client_key: cannot read {missing}: No such file or directory" in result.stderr


# --- 6, 7. a desired file's mistakes ----------------------------------------------------------------------------

def test_the_daemon_prints_every_mistake_of_its_desired_file_prefixed(fakepve: Any, fakepve_cafile: str,
                                                                       planner: server.Running,
                                                                       tmp_path: Path) -> None:
    """Three mistakes: three `pve-executor: FILE:LINE: ...` lines and the count, as `plan` prints them; exit 2."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    config:\n      memroy: 1024\n      cores: 0\n"
                       "  - vmid: 100\n", encoding="utf-8")
    result = _run(_once(fakepve, fakepve_cafile, planner, tmp_path, "--desired", str(desired)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pve-executor: {desired}:4: config.memroy: not a Proxmox config key; did you mean `memory`?",
        f"pve-executor: {desired}:5: config.cores: must be at least 1, got 0",
        f"pve-executor: {desired}:6: vmid: duplicate vmid 100 (first at line 2)",
        "pve-executor: 3 mistakes in the desired file; not started"]


def test_run_refuses_a_key_of_the_other_guest_type_as_plan_does(fakepve: Any, fakepve_cafile: str,
                                                                 planner: server.Running, tmp_path: Path) -> None:
    """`agent` on a container, beside a QEMU guest to start: the tick plans nothing from the file (as `plan`),
    names the file's line in its log and on stderr, and `run --once` exits 2; no write reached Proxmox (not
    an `unknown_key` APPROVAL at the gate)."""
    fakepve.add_ct(101, "cache", status="running", config={"memory": 512})
    add_vm(fakepve, 100, status="stopped")
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, state: running}\n  - vmid: 101\n    config:\n      agent: 1\n",
                       encoding="utf-8")
    before = len(fakepve.requests)
    result = _run(_once(fakepve, fakepve_cafile, planner, tmp_path, "--desired", str(desired)))
    mistake = f"{desired}:5: config.agent: not a Proxmox config key of a lxc guest (guest 101 is lxc)"
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"\npve-executor: {mistake}\n" in result.stderr
    assert f'"problems": ["{mistake}"]' in result.stderr and '"event": "desired_invalid"' in result.stderr
    assert "unknown_key" not in result.stderr and "APPROVAL_REQUIRED" not in result.stderr
    assert _writes(fakepve, before) == []
    assert fakepve.vm(100).status == "stopped"


# --- 8. the executor benchmark's scratch directory ----------------------------------------------------------

def test_the_executor_benchmark_makes_no_directory_at_import_and_removes_its_own(tmp_path: Path) -> None:
    """Importing bench/bench_executor.py makes no directory; the one a run makes is gone when it exits."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    imported = subprocess.run([sys.executable, "-c", "import bench.bench_executor"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert imported.returncode == 0, imported.stderr
    assert list(tmp_path.iterdir()) == []
    used = subprocess.run([sys.executable, "-c", "import bench.bench_executor as b; d = b.scratch(); "
                           "(d / 'x').write_text('x'); assert b.scratch() == d; print(d)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert used.returncode == 0, used.stderr
    assert Path(used.stdout.strip()).parent == tmp_path and list(tmp_path.iterdir()) == []
