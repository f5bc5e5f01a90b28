"""What ships to run it: the Dockerfile, the systemd units and pve-healthcheck (the image's health check).

The image cannot be built here, so the Dockerfile is linted (and run through hadolint where it is
installed); the units are checked for their hardening and, where systemd-analyze is present,
verified and rated for exposure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from planner import server
from tests.certs import Pki
from tests.executor_helpers import ROOT, run_module

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
MAX_EXPOSURE = 1.8  # systemd-analyze's "OK"; today's units score exactly this


def tool(name: str) -> str:
    """The path of a command-line tool (the virtualenv's first, e.g. hadolint from the dev extras), or skip."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed here")
    return found


def test_dockerfile_copies_what_exists_and_runs_installed_entry_points() -> None:
    """The image (not buildable here) is linted: sources exist, entry points exist, non-root, health check."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for words in lines:
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (ROOT / source).exists(), source
    copied = {words[1] for words in lines if words[0] == "COPY" and len(words) == 3}
    packaged = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in packaged} <= copied, "a package the wheel needs is not copied"
    scripts = (ROOT / "pyproject.toml").read_text()
    for command in ("pve-planner", "pve-executor", "pve-healthcheck"):
        assert command in text and f'{command} = "' in scripts
    assert text.count("FROM ") >= 2 and "USER " in text and "HEALTHCHECK" in text
    final = text[text.rindex("FROM "):]
    assert "pip install" not in final and "gcc" not in final  # no build tools in the final stage


def test_dockerfile_is_clean_under_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile, not even an info (exec-form commands, a numeric USER...)."""
    result = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", ["pve-reconcile-executor.service", "pve-reconcile-planner.service"])
def test_systemd_units_are_hardened(unit: str) -> None:
    """Restart on failure, hardening, and (executor) a state directory and credentials from a file."""
    text = (ROOT / "deploy" / "systemd" / unit).read_text()
    for directive in ("Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "ProtectHome=yes", "DynamicUser=yes"):
        assert directive in text, directive
    if "executor" in unit:
        assert "StateDirectory=pve-reconcile" in text and "LoadCredential=" in text
        assert "%d/" in text  # the secret is read from the credentials directory, never from the unit
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0].endswith(("pve-planner", "pve-executor"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_systemd_units_verify_cleanly(unit: Path, tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing: no unknown or misspelt directive, no bad value.

    It runs against a scratch root holding the system's units, this unit and stand-ins for the
    commands it starts (verify checks they are executable; they are installed only on a node).
    """
    analyze = tool("systemd-analyze")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
                        None)
    if system_units is None:
        pytest.skip("no systemd unit directory here")
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, tmp_path / "etc/systemd/system" / unit.name)
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            command = tmp_path / line.split("=", 1)[1].split()[0].lstrip("/")
            command.parent.mkdir(parents=True, exist_ok=True)
            command.write_text("#!/bin/sh\n")
            command.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", unit.name], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_systemd_units_exposure_is_ok(unit: Path) -> None:
    """systemd-analyze security --offline rates each unit's exposure at most 1.8 ("OK")."""
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE and found[2] == "OK", found[0]


def test_healthcheck_command_for_containers(pki: Pki, mtls_planner: server.Running) -> None:
    """pve-healthcheck exits 0 on SERVING (plaintext or mutual TLS) and 1 when nobody answers."""
    plain = server.start("127.0.0.1:0")
    try:
        ok = run_module("common.healthcheck", f"127.0.0.1:{plain.port}")
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
        secured = run_module("common.healthcheck", f"127.0.0.1:{mtls_planner.port}", "--tls-ca", pki.ca,
                             "--tls-cert", pki.client_cert, "--tls-key", pki.client_key, "--service",
                             "planner.v1.PlannerService")
        assert secured.returncode == 0
    finally:
        server.stop(plain, 0)
    assert run_module("common.healthcheck", f"127.0.0.1:{plain.port}", "--timeout", "1").returncode == 1


def test_healthcheck_reads_its_address_from_the_environment() -> None:
    """An exec-form HEALTHCHECK has no shell: given no address, pve-healthcheck reads PVE_HEALTH_ADDRESS."""
    plain = server.start("127.0.0.1:0")
    try:
        ok = run_module("common.healthcheck", env={"PVE_HEALTH_ADDRESS": f"127.0.0.1:{plain.port}"})
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    finally:
        server.stop(plain, 0)
    missing = run_module("common.healthcheck", env={"PVE_HEALTH_ADDRESS": ""})
    assert missing.returncode == 2 and "PVE_HEALTH_ADDRESS" in missing.stderr
    assert 'CMD ["/opt/pve-reconcile/bin/pve-healthcheck"]' in (ROOT / "Dockerfile").read_text()
