"""What ships to run it: the Dockerfile, the systemd units, deploy/install.sh and pve-healthcheck.

The image cannot be built here, so the Dockerfile is linted (and run through hadolint where it is
installed); the units are checked for their hardening and, where systemd-analyze is present,
verified and rated for exposure. The installed layout is proven by running it: deploy/install.sh
installs both services into a scratch root, and each unit is started there as systemd would start
it (tests/unitrun.py: its user, environment, credentials and directories), against fakepve over HTTPS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from planner import server
from tests import dockerrun, unitrun
from tests.certs import Pki
from tests.executor_helpers import ROOT, run_module, starts, unused_port
from tests.signing import default_doc, to_toml

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
INSTALL = ROOT / "deploy" / "install.sh"
SERVICE_USER = "pve-reconcile"  # deploy/sysusers.d/pve-reconcile.conf
WWW_DATA = 33  # Debian's www-data: /etc/pve (pmxcfs) is root:www-data, its CA 0640
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="installs as root and starts the services as their user")
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


def test_install_script_is_clean_under_shellcheck() -> None:
    """shellcheck (POSIX sh) finds nothing in deploy/install.sh: it runs on every node, as root."""
    result = subprocess.run([tool("shellcheck"), "--shell=sh", str(INSTALL)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_image_and_units_share_one_layout() -> None:
    """The image's user is the units' (from sysusers.d), with the units' state and runtime directories."""
    sysusers = (ROOT / "deploy/sysusers.d/pve-reconcile.conf").read_text()
    declared = [line.split()[1] for line in sysusers.splitlines() if line.startswith("u ")]
    assert declared == [SERVICE_USER]
    image = (ROOT / "Dockerfile").read_text()
    assert f"--no-create-home --shell /usr/sbin/nologin {SERVICE_USER}" in image
    unit = (ROOT / "deploy/systemd/pve-reconcile-executor.service").read_text().splitlines()
    for directive, folder in (("StateDirectory", "/var/lib/"), ("RuntimeDirectory", "/run/")):
        name = next(line.split("=", 1)[1] for line in unit if line.startswith(directive + "="))
        assert folder + name in image, directive
    exec_start = next(line for line in unit if line.startswith("ExecStart="))
    assert "--state-dir /var/lib/pve-reconcile" in exec_start
    assert "PVE_EXECUTOR_STATE_DIR=/var/lib/pve-reconcile" in image


@pytest.mark.parametrize("unit", ["pve-reconcile-executor.service", "pve-reconcile-planner.service"])
def test_systemd_units_are_hardened(unit: str) -> None:
    """Restart on failure, hardening, and (executor) a state directory and credentials from a file."""
    text = (ROOT / "deploy" / "systemd" / unit).read_text()
    for directive in ("Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "ProtectHome=yes", "RemoveIPC=yes", f"User={SERVICE_USER}", f"Group={SERVICE_USER}"):
        assert directive in text.splitlines(), directive
    # A dynamic uid reads nothing it is not given; the static user's group reads /etc/pve-reconcile.
    assert "DynamicUser=" not in text
    if "executor" in unit:
        assert "StateDirectory=pve-reconcile" in text and "LoadCredential=" in text
        assert "%d/" in text  # the secret is read from the credentials directory, never from the unit
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text.splitlines()  # systemctl reload: the trust store
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
    dropins = unit.parent / f"{unit.name}.d"  # install.sh's TLS drop-in: verified with the unit
    assert dropins.is_dir() and list(dropins.glob("*.conf")), dropins
    shutil.copytree(dropins, tmp_path / "etc/systemd/system" / dropins.name)
    for line in unit.read_text().splitlines():
        if line.startswith(("ExecStart=", "ExecReload=")):
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


@as_root
def test_units_name_only_documentation_that_exists(target: Path) -> None:
    """Each Documentation= is a page install.sh puts on the host (file:) or the project's own URL: nothing invented."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    urls = set(project.get("urls", {}).values())
    assert _install(target, "planner").returncode == 0  # as shipped: plaintext on loopback, needs no key
    assert _install(target, "executor").returncode == 1  # installed; the token still missing (another test)
    for unit in UNITS:
        documentation = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
                         if line.startswith("Documentation=")]
        assert documentation, unit.name
        for uri in " ".join(documentation).split():
            if uri.startswith("file:"):
                page = target / uri.removeprefix("file:").lstrip("/")
                assert page.read_text() == (ROOT / "README.md").read_text(), uri
            else:
                assert uri.split("#")[0] in urls, f"{unit.name}: {uri} is not a URL pyproject.toml names"


def _install(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTALL), "--root", str(root), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture(name="target")
def _target(tmp_path: Path) -> Path:
    """A scratch root with the package's commands in /opt/pve-reconcile/bin (pip's part of the install)."""
    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root and the services start as their own user")
    root = tmp_path / "root"
    for command in unitrun.ENTRY_POINTS:
        unitrun.console_script(root, command)
    return root


def _pve_ca(root: Path, cafile: str) -> None:
    """The CA where a Proxmox node has it: /etc/pve/pve-root-ca.pem, root:www-data 0640 (pmxcfs)."""
    folder = root / "etc/pve"
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, 0, WWW_DATA)
    shutil.copy(cafile, folder / "pve-root-ca.pem")
    os.chown(folder / "pve-root-ca.pem", 0, WWW_DATA)
    (folder / "pve-root-ca.pem").chmod(0o640)


def _edited(template: str, **settings: str) -> str:
    """A shipped config with ``settings`` set, as the operator edits it (a commented line is uncommented)."""
    lines = template.splitlines()
    for key, value in settings.items():
        at = next(i for i, line in enumerate(lines) if line.lstrip("# ").startswith(f"{key} ="))
        lines[at] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


EXECUTOR_TLS = {"planner_tls": "true", "planner_ca": '"/etc/pve-reconcile/tls/ca.pem"',
                "planner_client_cert": '"/etc/pve-reconcile/tls/executor.pem"',
                "planner_client_key": '"/etc/pve-reconcile/tls/executor.key"'}  # the shipped file's commented lines
PLANNER_TLS = {"tls_cert": '"/etc/pve-reconcile/tls/planner.pem"', "tls_key": '"/etc/pve-reconcile/tls/planner.key"',
               "tls_client_ca": '"/etc/pve-reconcile/tls/ca.pem"'}


def _operator_files(tmp_path: Path, fakepve: Any, planner_port: int) -> dict[str, Path]:
    """What the operator brings for mutual TLS: edited configs (the TLS lines uncommented), the token secret, a
    desired file, a trust store."""
    made = tmp_path / "operator"
    made.mkdir()
    files = {
        "executor.toml": _edited((ROOT / "deploy/executor.toml").read_text(), **EXECUTOR_TLS,
                                 pve_url=f'"{_fakepve_url(fakepve)}"', planner=f'"127.0.0.1:{planner_port}"',
                                 metrics_listen=f'"127.0.0.1:{unused_port()}"',
                                 trust_store='"/etc/pve-reconcile/trust.toml"'),
        "planner.toml": _edited((ROOT / "deploy/planner.toml").read_text(), **PLANNER_TLS,
                                listen=f'"127.0.0.1:{planner_port}"', metrics_listen=f'"127.0.0.1:{unused_port()}"'),
        "desired.yaml": "guests:\n  - vmid: 100\n    state: running\n",
        "trust.toml": to_toml(default_doc()),
    }
    for name, text in files.items():
        (made / name).write_text(text)
    return {name: made / name for name in files}


def _fakepve_url(fakepve: Any) -> str:
    """https://127.0.0.1:PORT of the fakepve fixture."""
    return f"https://127.0.0.1:{fakepve.port}"


def _wait_listening(child: subprocess.Popen[str], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert child.poll() is None, "the planner died: " + (child.stderr.read() if child.stderr else "")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, "the planner never listened"
        time.sleep(0.1)


def _stop(child: subprocess.Popen[str]) -> str:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        _, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
    return err


@as_root
def test_installed_as_the_readme_says_both_services_read_their_files_and_converge_a_guest(
        target: Path, tmp_path: Path, fakepve: Any, fakepve_cafile: str, pki: Pki) -> None:
    """install.sh installs both services; each started as systemd starts it (its static user, the unit's
    environment, its credentials) reads every file it needs: the planner its config, certificate and key
    (mutual TLS), the executor its config, token, PVE's CA (root:www-data in /etc/pve), planner key, desired
    file and trust store; one guest is started on fakepve."""
    fakepve.apitokens["reconcile@pve!executor"] = "tok-5e1d-SECRET"
    guest = fakepve.add_vm(100, "web", status="stopped")
    _pve_ca(target, fakepve_cafile)
    port = unused_port()
    given = _operator_files(tmp_path, fakepve, port)
    planner = _install(target, "planner", "--config", str(given["planner.toml"]), "--tls-ca", pki.ca,
                       "--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    assert planner.returncode == 0, planner.stderr
    executor = _install(target, "executor", "--config", str(given["executor.toml"]), "--tls-ca", pki.ca,
                        "--tls-cert", pki.client_cert, "--tls-key", pki.client_key, "--token", "-",
                        "--desired", str(given["desired.yaml"]), "--trust-store", str(given["trust.toml"]),
                        stdin="tok-5e1d-SECRET\n")
    assert executor.returncode == 0, executor.stderr
    for dropin in ("pve-reconcile-planner.service.d/tls-key.conf",
                   "pve-reconcile-executor.service.d/planner-mtls.conf"):
        assert (target / "etc/systemd/system" / dropin).is_file(), dropin  # the keys reach the services this way
    serving = unitrun.start(target, "pve-reconcile-planner.service")
    try:
        _wait_listening(serving, port)
        run = unitrun.start(target, "pve-reconcile-executor.service", extra=("--once",))
        _, log = run.communicate(timeout=90)
    finally:
        planner_log = _stop(serving)
    assert run.returncode == 0, log + planner_log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert "trust_store_loaded" in {e["event"] for e in events}, log
    assert len(starts(fakepve, 100)) == 1 and guest.status == "running"
    service = unitrun.identity_of(target, unitrun.Unit.read(target, "pve-reconcile-executor.service"))
    journal = [p for p in (target / "var/lib/pve-reconcile").rglob("*") if p.is_file()]
    assert journal and {p.stat().st_uid for p in journal} == {service.uid}  # written by the service user, not root
    assert "tok-5e1d-SECRET" not in log


def _readme_block(step: str, fence: str = "```sh\n") -> str:
    """The first code block of the README after ``step`` (a quick-start step's bold title)."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(step):]
    start = after.index(fence) + len(fence)
    return after[start:after.index("```\n", start)]


def _readme_executor_toml(url: str, port: int) -> str:
    """The executor.toml of the README's quick start, step 3, for fakepve and the test's planner port."""
    block = _readme_block("**3. The executor's settings**", "```toml\n")
    assert 'pve_url = "https://127.0.0.1:8006"' in block and 'planner = "127.0.0.1:50051"' in block, block
    block = block.replace("https://127.0.0.1:8006", url).replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    # The reload below needs a trust store (README, "Approvals, step by step", adds it so), and short ticks.
    return block + 'trust_store = "/etc/pve-reconcile/trust.toml"\ninterval = 0.5\n'


def _quick_start_files(root: Path, fakepve: Any, port: int) -> None:
    """What the quick start's steps 1, 3 and 4 leave in /etc/pve-reconcile, as root made them (no group yet)."""
    etc = root / "etc/pve-reconcile"
    etc.mkdir(parents=True, mode=0o755)
    (etc / "pve-token").write_text("tok-5e1d-SECRET\n")
    (etc / "pve-token").chmod(0o600)
    (etc / "executor.toml").write_text(_readme_executor_toml(_fakepve_url(fakepve), port))
    (etc / "desired.yaml").write_text("guests:\n  - vmid: 100\n    state: running\n")
    (etc / "trust.toml").write_text(to_toml(default_doc()))
    (etc / "planner.toml").write_text((ROOT / "deploy/planner.toml").read_text().replace(
        'listen = "127.0.0.1:50051"', f'listen = "127.0.0.1:{port}"').replace(
        'metrics_listen = "127.0.0.1:9200"', f'metrics_listen = "127.0.0.1:{unused_port()}"'))


def _events(child: subprocess.Popen[str], lines: list[str], wanted: str, count: int, timeout: float = 60.0) -> None:
    """Read the service's JSON log lines into ``lines`` until ``wanted`` was logged ``count`` times."""
    assert child.stderr is not None
    deadline = time.monotonic() + timeout
    while sum(1 for line in lines if f'"event": "{wanted}"' in line) < count:
        assert time.monotonic() < deadline, f"no {count}x {wanted}:\n" + "".join(lines)
        line = child.stderr.readline()
        assert line, f"the service ended before {count}x {wanted}:\n" + "".join(lines)
        lines.append(line)


@as_root
def test_installed_without_tls_as_the_quick_start_does_the_services_start_converge_and_reload(
        target: Path, fakepve: Any, fakepve_cafile: str) -> None:
    """The quick start's one node: the planner plaintext on loopback, no TLS key anywhere. install.sh takes over
    what steps 1-4 left in /etc/pve-reconcile and installs no TLS drop-in; both units start (systemd would fail
    one whose credential file is missing), the executor converges a guest, and `systemctl reload` (ExecReload=,
    SIGHUP) makes the running daemon load its trust store again."""
    fakepve.apitokens["reconcile@pve!executor"] = "tok-5e1d-SECRET"
    guest = fakepve.add_vm(100, "web", status="stopped")
    _pve_ca(target, fakepve_cafile)
    port = unused_port()
    _quick_start_files(target, fakepve, port)
    (target / "var/lib").mkdir(parents=True)
    step2 = server.start(f"127.0.0.1:{port}")  # `pve-planner serve --listen 127.0.0.1:50051 &`
    try:
        step5 = _readme_block("**5. Look, then converge.**")  # plan, then run --once: as root, by hand
        root = unitrun.Identity(0, 0, (0,), home="/root", shell="/bin/sh", name="root")
        path = f"/opt/pve-reconcile/bin:{unitrun.SYSTEMD_PATH}"  # the README's Install puts them on PATH
        by_hand = unitrun.run_as(target, root, ["sh", "-uc", step5], {"PATH": path}, ("/var/lib",))
        _, err = by_hand.communicate(timeout=90)
    finally:
        server.stop(step2, 0)  # `kill %1`
    assert by_hand.returncode == 0, err
    assert len(starts(fakepve, 100)) == 1 and guest.status == "running"
    assert {p.stat().st_uid for p in (target / "var/lib/pve-reconcile").rglob("*")} == {0}  # root's journal
    guest.status = "stopped"  # the service has work to do
    for role in ("planner", "executor"):
        installed = _install(target, role)
        assert installed.returncode == 0, installed.stderr
    assert not (target / "etc/systemd/system/pve-reconcile-executor.service.d").exists()
    assert not (target / "etc/systemd/system/pve-reconcile-planner.service.d").exists()
    serving = unitrun.start(target, "pve-reconcile-planner.service")
    lines: list[str] = []
    try:
        _wait_listening(serving, port)
        daemon = unitrun.start(target, "pve-reconcile-executor.service")
        try:
            _events(daemon, lines, "trust_store_loaded", 1)
            _events(daemon, lines, "tick", 2)
            assert len(starts(fakepve, 100)) == 2 and guest.status == "running"
            assert unitrun.reload(target, "pve-reconcile-executor.service", daemon) == 0
            _events(daemon, lines, "trust_store_loaded", 2)
            assert daemon.poll() is None  # reloaded, not ended (SIGHUP's default action would end it)
        finally:
            lines.append(_stop(daemon))
    finally:
        planner_log = _stop(serving)
    assert daemon.returncode == 0, "".join(lines) + planner_log
    assert "tok-5e1d-SECRET" not in "".join(lines)


@as_root
def test_a_tls_setting_without_its_key_or_a_key_without_its_setting_is_named(target: Path, tmp_path: Path) -> None:
    """The TLS key and the config's certificate go together: install.sh names the half that is missing (exit 1),
    where the service would only fail at its start."""
    config, key = tmp_path / "executor.toml", tmp_path / "executor.key"
    config.write_text(_edited((ROOT / "deploy/executor.toml").read_text(), **EXECUTOR_TLS))
    key.write_text("KEY\n")
    (target / "etc/pve").mkdir(parents=True)
    (target / "etc/pve/pve-root-ca.pem").write_text("CA\n")
    (tmp_path / "token").write_text("SECRET\n")
    no_key = _install(target, "executor", "--config", str(config), "--token", str(tmp_path / "token"))
    assert no_key.returncode == 1 and "/etc/pve-reconcile/tls/executor.key (executor.toml names planner_client_cert)" \
        in no_key.stderr, no_key.stderr
    assert not (target / "etc/systemd/system/pve-reconcile-executor.service.d").exists()
    plain = tmp_path / "plain.toml"
    plain.write_text((ROOT / "deploy/executor.toml").read_text())
    no_setting = _install(target, "executor", "--config", str(plain), "--tls-key", str(key))
    assert no_setting.returncode == 1 and "planner_client_cert in /etc/pve-reconcile/executor.toml" in no_setting.stderr
    both = _install(target, "executor", "--config", str(config))  # the key installed by the run before
    assert both.returncode == 0, both.stderr
    assert (target / "etc/systemd/system/pve-reconcile-executor.service.d/planner-mtls.conf").read_bytes() == \
        (ROOT / "deploy/systemd/pve-reconcile-executor.service.d/planner-mtls.conf").read_bytes()
    (target / "etc/pve-reconcile/tls/executor.key").unlink()
    config.write_text((ROOT / "deploy/executor.toml").read_text())
    plain_again = _install(target, "executor", "--config", str(config))
    assert plain_again.returncode == 0, plain_again.stderr
    assert not (target / "etc/systemd/system/pve-reconcile-executor.service.d").exists()  # no key, no drop-in


@as_root
def test_a_uid_outside_the_group_cannot_read_the_installed_config(target: Path, tmp_path: Path) -> None:
    """The check above can fail: the same layout started as a dynamic uid with its own group (DynamicUser=
    without the group) is refused its config, exit 2 naming the file."""
    (tmp_path / "token").write_text("SECRET\n")
    (tmp_path / "key").write_text("KEY\n")
    _pve_ca(target, str(tmp_path / "token"))
    installed = _install(target, "executor", "--token", str(tmp_path / "token"))
    assert installed.returncode == 0, installed.stderr
    dynamic = unitrun.Identity(uid=61_234, gid=61_234, groups=(61_234,), name="pve-reconcile-executor")
    run = unitrun.start(target, "pve-reconcile-executor.service", who=dynamic, extra=("--once",))
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2, err
    assert "cannot read /etc/pve-reconcile/executor.toml: Permission denied" in err


def _layout(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o7777)
            for p in [*sorted((root / "etc/pve-reconcile").rglob("*")), root / "etc/pve-reconcile"]}


@as_root
def test_install_sets_owners_and_modes_keeps_an_edited_config_and_runs_again(target: Path, tmp_path: Path) -> None:
    """Readable files root:pve-reconcile 0640, secrets root:root 0600 (the group, which operators join for the
    API socket, never reads a key or the token); a second run keeps the edited config and puts back the owners
    and modes of files already there."""
    key, token = tmp_path / "executor.key", tmp_path / "token"
    key.write_text("KEY\n")
    token.write_text("SECRET\n")
    (target / "etc/pve").mkdir(parents=True)
    (target / "etc/pve/pve-root-ca.pem").write_text("CA\n")
    config = tmp_path / "executor.toml"
    config.write_text(_edited((ROOT / "deploy/executor.toml").read_text(), **EXECUTOR_TLS))
    args = ("executor", "--config", str(config), "--token", str(token), "--tls-key", str(key), "--tls-ca", str(key),
            "--tls-cert", str(key), "--desired", str(token), "--trust-store", str(token))
    assert _install(target, *args).returncode == 0
    gid = unitrun.identity_of(target, unitrun.Unit.read(target, "pve-reconcile-executor.service")).gid
    readable, secret, folder = (0, gid, 0o640), (0, 0, 0o600), (0, gid, 0o750)
    expected = {"etc/pve-reconcile": folder, "etc/pve-reconcile/tls": folder,
                "etc/pve-reconcile/executor.toml": readable, "etc/pve-reconcile/desired.yaml": readable,
                "etc/pve-reconcile/trust.toml": readable, "etc/pve-reconcile/tls/ca.pem": readable,
                "etc/pve-reconcile/tls/executor.pem": readable, "etc/pve-reconcile/tls/executor.key": secret,
                "etc/pve-reconcile/pve-token": secret}
    assert _layout(target) == expected
    edited = target / "etc/pve-reconcile/executor.toml"
    edited.write_text(edited.read_text().replace('node = "pve1"', 'node = "pve7"'))
    for name, mode in (("tls/executor.key", 0o640), ("desired.yaml", 0o600)):  # the earlier README's modes, and a slip
        os.chown(target / "etc/pve-reconcile" / name, 0, gid)
        (target / "etc/pve-reconcile" / name).chmod(mode)
    passwd = (target / "etc/passwd").read_text()
    again = _install(target, "executor")
    assert again.returncode == 0, again.stderr
    assert _layout(target) == expected and 'node = "pve7"' in edited.read_text()
    assert (target / "etc/passwd").read_text() == passwd


@as_root
def test_install_takes_over_a_group_made_by_hand(target: Path, tmp_path: Path) -> None:
    """A node set up by the earlier README has a pve-reconcile group (groupadd): the user joins it, its gid kept."""
    (target / "etc").mkdir(parents=True)
    (target / "etc/group").write_text("root:x:0:\npve-reconcile:x:990:\n")
    (target / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    assert _install(target, "planner").returncode == 0
    who = unitrun.identity_of(target, unitrun.Unit.read(target, "pve-reconcile-planner.service"))
    assert who.gid == 990 and who.name == SERVICE_USER


@as_root
def test_install_names_what_the_service_still_needs_and_refuses_bad_usage(target: Path, tmp_path: Path) -> None:
    """Exit 1 naming each file systemd would fail to hand over; exit 2 for a bad argument or an unreadable file."""
    missing = _install(target, "executor")
    assert missing.returncode == 1
    for path in ("/etc/pve-reconcile/pve-token", "/etc/pve/pve-root-ca.pem"):
        assert path in missing.stderr
    assert "executor.key" not in missing.stderr  # as shipped, TLS is off: no key needed
    assert (target / "etc/systemd/system/pve-reconcile-executor.service").is_file()  # the rest is installed
    for args in ((), ("planner", "--token", "-"), ("executor", "--desired"), ("executor", "--bogus"),
                 ("executor", "--desired", str(tmp_path / "absent.yaml"))):
        result = _install(target, *args)
        assert result.returncode == 2 and "install.sh: " in result.stderr, args
    helped = _install(target, "--help")
    assert helped.returncode == 0 and "executor|planner" in helped.stdout
    bare = tmp_path / "bare"
    result = _install(bare, "planner")
    assert result.returncode == 1 and "pip install" in result.stderr  # the package comes first


def _container_commands() -> str:
    """The shell block of docs/reference.md's "With the container image"."""
    text = (ROOT / "docs/reference.md").read_text()
    section = text[text.index("## With the container image"):]
    start = section.index("```sh\n") + len("```sh\n")
    return section[start:section.index("```\n", start)]


@as_root
def test_the_documented_container_commands_read_the_installed_layout(
        target: Path, tmp_path: Path, fakepve: Any, fakepve_cafile: str, pki: Pki) -> None:
    """docs/reference.md's container commands, run as written on a host that install.sh set up (docker recorded,
    then each `docker run` emulated: tests/dockerrun.py): the image's uid reads the host's root:pve-reconcile files
    through --group-add, never a root-only file; the planner serves mutual TLS with its key's copy, the executor
    takes the token from the root-only --env-file and converges a guest."""
    fakepve.apitokens["reconcile@pve!executor"] = "tok-5e1d-SECRET"
    guest = fakepve.add_vm(100, "web", status="stopped")
    (target / "etc").mkdir(parents=True)
    (target / "etc/group").write_text(f"root:x:0:\nwww-data:x:{WWW_DATA}:\n")  # a Debian host's
    _pve_ca(target, fakepve_cafile)
    node_planner = server.start("127.0.0.1:0")  # the planner the quick start's executor.toml names
    try:
        _quick_start_files(target, fakepve, node_planner.port)
        (target / "etc/pve-reconcile/planner.toml").write_text(
            _edited((ROOT / "deploy/planner.toml").read_text(), **PLANNER_TLS))
        assert _install(target, "executor").returncode == 0
        installed = _install(target, "planner", "--tls-ca", pki.ca, "--tls-cert", pki.server_cert, "--tls-key",
                             pki.server_key)
        assert installed.returncode == 0, installed.stderr
        calls = target / "var/lib/docker-calls"
        calls.mkdir(parents=True)
        docker = target / "usr/local/bin/docker"
        docker.write_text(dockerrun.RECORDER.format(calls="/var/lib/docker-calls"))
        docker.chmod(0o755)
        root = unitrun.Identity(0, 0, (0,), home="/root", shell="/bin/sh", name="root")
        shell = unitrun.run_as(target, root, ["sh", "-euc", _container_commands()], {"PATH": unitrun.SYSTEMD_PATH},
                               ("/etc/pve-reconcile", "/var/lib/docker-calls"))
        _, err = shell.communicate(timeout=60)
        assert shell.returncode == 0, err
        runs = [dockerrun.Run.parse(words) for words in dockerrun.recorded(calls) if words[0] == "run"]
        assert [run.command[:1] for run in runs] == [(), ("pve-executor",)]  # the image's CMD: the planner

        port = unused_port()
        planner = dockerrun.start(target, tmp_path / "planner-container", runs[0],
                                  env={"PVE_PLANNER_LISTEN": f"127.0.0.1:{port}"})  # -p's address, the test's
        try:
            _wait_listening(planner, port)
            health = run_module("common.healthcheck", f"127.0.0.1:{port}", "--tls-ca", pki.ca, "--tls-cert",
                                pki.client_cert, "--tls-key", pki.client_key)
            assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
        finally:
            planner_log = _stop(planner)
        assert '"mutual_tls": true' in planner_log, planner_log

        executor = dockerrun.start(target, tmp_path / "executor-container", runs[1], extra=("--once",))
        _, log = executor.communicate(timeout=90)
    finally:
        server.stop(node_planner, 0)
    assert executor.returncode == 0, log
    assert len(starts(fakepve, 100)) == 1 and guest.status == "running"
    assert "tok-5e1d-SECRET" not in log
    assert (target / "etc/pve-reconcile/pve-token").stat().st_mode & 0o777 == 0o600  # the host's stays root-only
