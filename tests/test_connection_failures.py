"""A failure to reach or use Proxmox keeps its cause, from the socket to the operator.

Every failure is real: fakepve over HTTPS with its self-signed certificate and no CA given, a port
bound and released (refused), a name under ``.invalid`` (which never resolves), a listener that accepts
and never answers (timeout), a wrong token secret (fakepve answers 401), and a token fakepve's ACLs give
VM.Audit but not VM.Config.Options (fakepve enforces privileges as PVE states them: 403 with PVE's text).
Each shows as one line on stderr (exit 1, no traceback) in ``plan``, ``run --once`` and ``selftest``, as
``cause=``/``hint=`` in the log, and as the ``cause`` label of the Proxmox error counter. No secret is
ever in any of it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from executor.metrics import ExecutorMetrics
from executor.pve.node import Connection, Credentials, ProxmoxNode, PveError
from planner import server
from tests.executor_helpers import ROOT, unused_port

TOKEN = "reconcile@pve!exec"
SECRET = "c0ffee00-token-secret-never-printed"  # a test token, fakepve's only
WRONG = "deadbeef-wrong-secret-never-printed"


@dataclass(frozen=True, slots=True)
class Case:
    """One cause: how to make it, its code, and the words (the flag among them) its line must hold."""

    url: str
    words: tuple[str, ...]
    secret: str = SECRET
    ca: bool = True
    extra: tuple[str, ...] = ()


@pytest.fixture(name="silent")
def _silent() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.fixture(name="cases")
def _cases(fakepve: Any, silent: int) -> dict[str, Case]:
    """Each connection failure, keyed by its cause code."""
    fakepve.apitokens[TOKEN] = SECRET
    here = f"https://127.0.0.1:{fakepve.port}"
    return {
        "tls_untrusted": Case(here, ("TLS certificate not trusted", "--pve-ca-file"), ca=False),
        "refused": Case(f"https://127.0.0.1:{unused_port()}", ("connection refused", "--pve-url")),
        "dns": Case("https://nonexistent.invalid:8006", ("unknown host", "--pve-url")),
        "timeout": Case(f"https://127.0.0.1:{silent}", ("no answer within 1 s", "--pve-timeout"),
                        extra=("--pve-timeout", "1")),
        "auth": Case(here, ("(401", TOKEN, "--pve-token-id", "--pve-token-file"), secret=WRONG),
    }


def command(case: Case, cafile: str, tmp_path: Path, planner: str, *args: str) -> list[str]:
    """pve-executor ``args`` with the case's URL, token (its secret in a file) and ``cafile`` (or none), JSON logs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "token"
    secret.write_text(case.secret + "\n")
    ca = ["--pve-ca-file", cafile] if case.ca else []
    return [sys.executable, "-m", "executor", *args, "--node", "pve1", "--pve-url", case.url, "--pve-token-id", TOKEN,
            "--pve-token-file", str(secret), *ca, *case.extra, "--planner", planner, "--log-format", "json"]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The command, to its end (a minute at most)."""
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    """The last line of stderr, checked: exit 1, no traceback, no secret anywhere."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and SECRET not in output and WRONG not in output, output
    return result.stderr.strip().splitlines()[-1]


def events(result: subprocess.CompletedProcess[str], name: str) -> list[dict[str, Any]]:
    """The JSON log events called ``name`` on stderr."""
    found = []
    for line in result.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            found.append(event)
    return found


CODES = ("tls_untrusted", "refused", "dns", "timeout", "auth")


def run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess[str]]:
    """The commands at once (each is mostly start-up and waiting), to their ends."""
    children = {key: subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for key, argv in commands.items()}
    results = {}
    for key, child in children.items():
        out, err = child.communicate(timeout=60)
        results[key] = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    return results


def test_plan_says_why_it_cannot_reach_proxmox_and_which_flag_to_fix(cases: dict[str, Case], fakepve_cafile: str,
                                                                      tmp_path: Path) -> None:
    """`plan`: for each cause one line naming it and the flag; no cause reads as another."""
    results = run_all({code: command(cases[code], fakepve_cafile, tmp_path / code, "127.0.0.1:1", "plan")
                       for code in CODES})
    for code, result in results.items():
        line = last_line(result)
        assert line.startswith("pve-executor: Proxmox: "), line
        assert all(word in line for word in cases[code].words), (code, line)
        others = [cases[other].words[0] for other in CODES if other != code]
        assert not any(word in line for word in others), (code, line)


def test_run_once_logs_the_cause_and_the_hint_and_ends_with_one_line(cases: dict[str, Case], fakepve_cafile: str,
                                                                     tmp_path: Path) -> None:
    """`run --once`: the tick event carries cause= (a stable code) and hint= (naming the flag); a last line."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n")
    results = run_all({code: command(cases[code], fakepve_cafile, tmp_path / code, "127.0.0.1:1", "run", "--once",
                                     "--desired", str(desired), "--state-dir", str(tmp_path / code / "state"))
                       for code in CODES})
    for code, result in results.items():
        case = cases[code]
        line = last_line(result)
        assert line.startswith("pve-executor: Proxmox: ") and case.words[0] in line, line
        ticks = events(result, "tick")
        assert [(t["outcome"], t.get("cause")) for t in ticks] == [("pve_unavailable", code)], ticks
        flag = next(word for word in case.words if word.startswith("--"))
        assert flag in ticks[0]["hint"], ticks[0]


def test_a_wrong_password_names_the_password_flags(fakepve: Any, fakepve_cafile: str, tmp_path: Path) -> None:
    """Password login refused (401 at the ticket): the line names --pve-user and --pve-password-file."""
    password = tmp_path / "password"
    password.write_text(WRONG + "\n")
    result = run([sys.executable, "-m", "executor", "plan", "--node", "pve1", "--pve-url",
                  f"https://127.0.0.1:{fakepve.port}", "--pve-user", "root@pam", "--pve-password-file", str(password),
                  "--pve-ca-file", fakepve_cafile, "--planner", "127.0.0.1:1"])
    line = last_line(result)
    assert "401" in line and "--pve-user" in line and "--pve-password-file" in line, line


@pytest.fixture(name="auditor")
def _auditor(fakepve: Any, tmp_path: Path, fakepve_cafile: str) -> Callable[..., list[str]]:
    """pve-executor as a token that may read guests (VM.Audit on /vms) and change nothing; guest 100 runs."""
    fakepve.add_vm(100, "vm1", status="running")
    fakepve.apitokens[TOKEN] = SECRET
    fakepve.grant(TOKEN, "/vms", "VM.Audit")
    case = Case(f"https://127.0.0.1:{fakepve.port}", ())

    def make(planner: str, *args: str) -> list[str]:
        return command(case, fakepve_cafile, tmp_path, planner, *args)
    return make


GRANT = ("Permission check failed (/vms/100, VM.Config.Options)", "VM.Config.Options on /vms/100",
         f"pveum acl modify /vms/100 --tokens '{TOKEN}'")


def test_run_once_names_the_privilege_proxmox_refused(auditor: Callable[..., list[str]], planner: server.Running,
                                                      tmp_path: Path) -> None:
    """A write PVE refuses (403, its text names path and privilege): the action event has cause=privilege and
    the hint says what to grant to whom; the last line says so too."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    description: managed\n")
    result = run(auditor(f"127.0.0.1:{planner.port}", "run", "--once", "--desired", str(desired),
                         "--state-dir", str(tmp_path / "state")))
    line = last_line(result)
    assert line.startswith("pve-executor: 1 action(s) failed: guest 100 set_config: "), line
    assert all(part in line for part in GRANT), line
    actions = [e for e in events(result, "action") if e["outcome"] == "failed"]
    assert actions and all(e["cause"] == "privilege" and GRANT[2] in e["hint"] for e in actions), actions


def test_selftest_names_the_privilege_proxmox_refused(auditor: Callable[..., list[str]],
                                                      planner: server.Running) -> None:
    """selftest's description write refused for VM.Config.Options: its last line names the privilege and path."""
    line = last_line(run(auditor(f"127.0.0.1:{planner.port}", "selftest", "--vmid", "100")))
    assert line.startswith("pve-executor: Proxmox: the description write failed: guest 100 set_config: "), line
    assert all(part in line for part in GRANT), line


def test_selftest_says_why_it_cannot_reach_proxmox(tmp_path: Path, planner: server.Running) -> None:
    """selftest against a closed port: one line, the cause and the flag."""
    case = Case(f"https://127.0.0.1:{unused_port()}", (), ca=False)
    line = last_line(run(command(case, "", tmp_path, f"127.0.0.1:{planner.port}", "selftest", "--vmid", "100")))
    assert line.startswith("pve-executor: Proxmox: cannot reach") and "connection refused" in line, line
    assert "--pve-url" in line, line


def test_a_synchronous_403_names_the_privilege_and_is_counted_by_cause(fakepve: Any, fakepve_cafile: str) -> None:
    """A config read without VM.Audit on the guest: PVE's 403 keeps its text, gains the grant, counts as privilege.

    (fakepve's hand-written /cluster/status does not check the Sys.Audit its schema states; a guest's config does.)
    """
    fakepve.add_vm(100, "vm1")
    fakepve.apitokens[TOKEN] = SECRET
    fakepve.grant(TOKEN, "/vms/101", "VM.Audit")  # another guest's: the ACL is on, guest 100 not in it
    metrics = ExecutorMetrics()
    node = ProxmoxNode(Connection(host="127.0.0.1", port=fakepve.port, node="pve1", ca_file=fakepve_cafile,
                                  credentials=Credentials(user=TOKEN, token_secret=SECRET)), on_error=metrics.pve_error)
    with pytest.raises(PveError) as caught:
        node.config("qemu", 100)
    error = caught.value
    assert (error.status, error.cause) == (403, "privilege")
    assert str(error).startswith("Permission check failed (/vms/100, VM.Audit)"), error
    assert "VM.Audit on /vms/100" in error.hint and f"pveum acl modify /vms/100 --tokens '{TOKEN}'" in error.hint
    assert SECRET not in str(error)
    assert metrics.registry.get_sample_value("pve_executor_pve_api_errors_total",
                                             {"status": "403", "cause": "privilege"}) == 1


def test_no_answer_is_counted_by_its_cause(fakepve: Any, fakepve_cafile: str, silent: int) -> None:
    """The Proxmox error counter tells a refused port from a timeout (status none, cause apart)."""
    fakepve.apitokens[TOKEN] = SECRET
    metrics = ExecutorMetrics()
    for port, timeout in ((unused_port(), 30.0), (silent, 1.0)):
        node = ProxmoxNode(Connection(host="127.0.0.1", port=port, node="pve1", ca_file=fakepve_cafile,
                                      credentials=Credentials(user=TOKEN, token_secret=SECRET), timeout=timeout),
                           on_error=metrics.pve_error)
        with pytest.raises(PveError):
            node.guests()
    for cause in ("refused", "timeout"):
        assert metrics.registry.get_sample_value("pve_executor_pve_api_errors_total",
                                                 {"status": "none", "cause": cause}) == 1, cause


def test_a_password_account_with_a_second_factor_is_told_to_use_a_token(fakepve: Any, fakepve_cafile: str) -> None:
    """fakepve answers the ticket with NeedTFA (as PVE does for a TFA account): the way out is an API token."""
    fakepve.tfa = True
    metrics = ExecutorMetrics()
    with pytest.raises(PveError) as caught:
        ProxmoxNode(Connection(host="127.0.0.1", port=fakepve.port, node="pve1", ca_file=fakepve_cafile,
                               credentials=Credentials(user="root@pam", password="secret")), on_error=metrics.pve_error)
    assert caught.value.cause == "auth_tfa" and "--pve-token-id" in str(caught.value), caught.value
    assert metrics.registry.get_sample_value("pve_executor_pve_api_errors_total",
                                             {"status": "401", "cause": "auth_tfa"}) == 1


@pytest.fixture(name="plain_http")
def _plain_http() -> Iterator[int]:
    """A port on 127.0.0.1 that answers plain HTTP (a web server where Proxmox's TLS port was meant)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


def test_a_port_that_does_not_speak_tls_says_so(fakepve_cafile: str, plain_http: int) -> None:
    """Plain HTTP where TLS was expected: cause tls, OpenSSL's reason, and the port in --pve-url to check."""
    with pytest.raises(PveError) as caught:
        ProxmoxNode(Connection(host="127.0.0.1", port=plain_http, node="pve1", ca_file=fakepve_cafile,
                               credentials=Credentials(user=TOKEN, token_secret=SECRET))).guests()
    assert caught.value.cause == "tls" and "--pve-url" in str(caught.value), caught.value
    assert "WRONG_VERSION_NUMBER" in str(caught.value), caught.value
