"""Matrix row 54: the executor API on a Unix socket, who calls it, rate buckets per caller, a narrow before-image.

Any local process could call the API on 127.0.0.1:50052: a junk SubmitOp flood drained the one rate bucket
the operator's valid op needed, and ProposeOp answered with a guest's whole config. Now the API serves a
Unix socket (0660, group pve-reconcile, in a 0750 directory) by default; each call's caller is known (the
kernel's SO_PEERCRED on the socket, the peer address over TCP), each caller has its own bucket, and the
before-image holds the proposal's keys and the digest only.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from common import grpcserver
from common.grpcserver import ServerTls
from executor.api.server import start_api
from executor.config import ExecutorSettings
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.signed.rates import RateBuckets
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from opctl import cli as opcli
from opctl.api import to_proto
from planner import server
from tests.certs import Pki
from tests.executor_helpers import ROOT, LineReader, cli, run_module
from tests.signed_helpers import add_vm, open_desk, run_command

Make = Callable[..., Engine]
DEFAULT = "unix:/run/pve-reconcile/executor.sock"
SUBMIT = "/executor.v1.ExecutorService/SubmitOp"
RECONCILE = "/executor.v1.ExecutorService/Reconcile"


@pytest.fixture(name="sock_dir")
def _sock_dir() -> Iterator[Path]:
    """A short directory under /tmp (a socket path must stay under 108 bytes), traversable by other uids."""
    path = Path(tempfile.mkdtemp(prefix="pvr-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def health(target: str, timeout: float = 2.0) -> int:
    """The health status the server at ``target`` answers (an RpcError when nothing does)."""
    with grpc.insecure_channel(target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status)


def junk() -> epb.SignedOp:
    """A SubmitOp body no key signed."""
    return epb.SignedOp(payload_type="application/vnd.pve-reconcile.op+json", payload=os.urandom(64),
                        signatures=[epb.OpSignature(keyid="sha256:" + "0" * 64, sig=os.urandom(64))])


def flood(target: str, stop: Callable[[], bool], started: Callable[[], None] = lambda: None) -> dict[str, int]:
    """Junk SubmitOps at ``target`` until ``stop()``; ``started()`` at the first RESOURCE_EXHAUSTED. The counts."""
    counts = {"answered": 0, "exhausted": 0}
    with grpc.insecure_channel(target) as channel:
        stub = epb_grpc.ExecutorServiceStub(channel)
        while not stop():
            try:
                stub.SubmitOp(epb.SubmitOpRequest(op=junk()), timeout=10)
                counts["answered"] += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                counts["exhausted"] += 1
                if counts["exhausted"] == 1:
                    started()
    return counts


def other_group() -> grp.struct_group:
    """A group this process may give a file (root: any; others: a supplementary group), not its own."""
    if os.geteuid() == 0:
        return grp.getgrgid(65534) if _has_gid(65534) else next(g for g in grp.getgrall() if g.gr_gid != 0)
    groups = [g for g in os.getgroups() if g != os.getegid()]
    if not groups:
        pytest.skip("this user is in no second group to give the socket")
    return grp.getgrgid(groups[0])


def _has_gid(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


# --- 1. a Unix socket by default -----------------------------------------------------------------------------

def test_the_api_listens_on_a_unix_socket_by_default_and_the_commands_go_there() -> None:
    """The daemon's default listen address, the shipped executor.toml and the operator commands' default
    target are all the socket; --api and PVE_EXECUTOR_API still choose another."""
    assert ExecutorSettings().listen == DEFAULT
    shown = run_module("executor", "run", "--node", "pve1", "--print-config")
    assert f'listen = "{DEFAULT}"' in shown.stdout, shown.stdout + shown.stderr
    assert f'listen = "{DEFAULT}"' in (ROOT / "deploy" / "executor.toml").read_text()
    no_flag = argparse.Namespace(api=None)
    saved = os.environ.pop(opcli.API_ENV, None)
    try:
        assert opcli.api_target(no_flag) == DEFAULT
        os.environ[opcli.API_ENV] = "127.0.0.1:50052"
        assert opcli.api_target(no_flag) == "127.0.0.1:50052"
        assert opcli.api_target(argparse.Namespace(api="unix:/tmp/x.sock")) == "unix:/tmp/x.sock"
    finally:
        os.environ.pop(opcli.API_ENV, None)
        if saved is not None:
            os.environ[opcli.API_ENV] = saved


def test_the_socket_is_0660_in_the_service_group_in_a_0750_directory(sock_dir: Path, make_engine: Make) -> None:
    """The socket and the directory made for it belong to the service group: its members and root reach the
    API, nobody else can even look up the socket's name."""
    group = other_group()
    path = sock_dir / "run" / "executor.sock"
    api = start_api(make_engine([]), f"unix:{path}", socket_group=group.gr_name)
    try:
        mode = path.stat()
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == group.gr_gid
        folder = path.parent.stat()
        assert stat.S_IMODE(folder.st_mode) == 0o750 and folder.st_gid == group.gr_gid
        assert health(f"unix:{path}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        api.stop(0)
    assert not path.exists()


def test_a_directory_there_already_that_the_group_cannot_pass_is_named_in_a_warning(sock_dir: Path,
                                                                                     make_engine: Make) -> None:
    """Found following the README: the group created after a first start, the directory the daemon made then
    stays root's; its members got "Permission denied" and nothing said why. The daemon never changes a directory
    it did not make now (it may be /run itself), but it names the one to fix."""
    group = other_group()
    folder = sock_dir / "run"
    folder.mkdir(mode=0o750)
    os.chmod(folder, 0o750)
    with capture_logs() as logs:
        api = start_api(make_engine([]), f"unix:{folder / 'executor.sock'}", socket_group=group.gr_name)
    api.stop(0)
    warned = [e for e in logs if e["event"] == "api_socket_directory_unreachable"]
    assert warned and warned[0]["directory"] == str(folder) and f"chgrp {group.gr_name}" in warned[0]["remedy"]
    assert folder.stat().st_gid == os.getegid()  # left as it was


def test_without_the_group_the_socket_keeps_the_daemons_group_and_says_which_group_to_create(
        sock_dir: Path, make_engine: Make) -> None:
    """No pve-reconcile group on the host: only root (and the daemon's user) reach the socket, and a warning
    names the group to create."""
    path = sock_dir / "executor.sock"
    with capture_logs() as logs:
        api = start_api(make_engine([]), f"unix:{path}", socket_group="pvr-no-such-group")
    try:
        assert path.stat().st_gid == os.getegid() and stat.S_IMODE(path.stat().st_mode) == 0o660
        warned = [e for e in logs if e["event"] == "api_socket_group_missing"]
        assert warned and warned[0]["group"] == "pvr-no-such-group" and warned[0]["log_level"] == "warning"
    finally:
        api.stop(0)


def test_a_socket_path_too_long_for_the_kernel_is_a_config_error(tmp_path: Path) -> None:
    """sun_path holds 107 bytes: a longer path is refused at start, naming the setting (no traceback)."""
    password = tmp_path / "pw"
    password.write_text("x")
    long = "/tmp/" + "d" * 110 + "/executor.sock"
    result = run_module("executor", "run", "--node", "pve1", "--pve-user", "root@pam", "--pve-password-file",
                        str(password), "--listen", f"unix:{long}", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2 and "listen" in result.stderr and "108" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


class Daemon:
    """``pve-executor run`` on a Unix socket, its JSON log read by a thread."""

    def __init__(self, command: list[str], socket_path: Path) -> None:
        self.target = f"unix:{socket_path}"
        self.child = subprocess.Popen([*command, "--listen", self.target], cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
        assert self.child.stderr is not None
        self.log = LineReader(self.child.stderr)

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until its health service answers SERVING on the socket."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.child.poll() is None, f"the daemon exited {self.child.returncode}: {''.join(self.log.lines)}"
            try:
                if health(self.target, 1) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the daemon never served"
            time.sleep(0.05)

    def close(self) -> None:
        """SIGKILL if it still runs."""
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
            self.child.wait(10)


def test_a_killed_daemons_socket_is_taken_over_and_a_live_ones_is_refused(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path, sock_dir: Path) -> None:
    """SIGKILL leaves the socket file behind: the next start serves on it. A second daemon started while the
    first serves exits 1 (refused, as a taken port is) naming the socket (no traceback), and the first keeps
    its socket."""
    path = sock_dir / "executor.sock"
    command = run_command(fakepve, fakepve_cafile, planner.port, tmp_path)
    first = Daemon(command, path)
    try:
        first.wait_serving()
        first.close()
        assert path.exists(), "SIGKILL leaves the socket file"
        second = Daemon(command, path)
        try:
            second.wait_serving()
            other = tmp_path / "other"
            other.mkdir()
            intruder = subprocess.run(
                [*cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", other, "run",
                      "--state-dir", str(other / "state"), "--interval", "30"), "--listen", f"unix:{path}"],
                cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
            assert intruder.returncode == 1, intruder.stderr
            assert str(path) in intruder.stderr and "another" in intruder.stderr and "Traceback" not in intruder.stderr
            assert health(second.target) == health_pb2.HealthCheckResponse.SERVING
            second.child.send_signal(signal.SIGTERM)
            assert second.child.wait(15) == 0
            assert not path.exists()
        finally:
            second.close()
    finally:
        first.close()


# --- 2. who calls ----------------------------------------------------------------------------------------------

def test_each_mutating_call_logs_the_callers_uid_pid_and_gid(sock_dir: Path, make_engine: Make) -> None:
    """Over the socket the kernel names the caller (SO_PEERCRED): Reconcile is logged with this process's
    uid, gid and pid; a read (GetStatus) is not logged."""
    path = sock_dir / "executor.sock"
    api = start_api(make_engine([]), f"unix:{path}")
    try:
        with capture_logs() as logs, grpc.insecure_channel(f"unix:{path}") as channel:
            stub = epb_grpc.ExecutorServiceStub(channel)
            stub.GetStatus(epb.GetStatusRequest(), timeout=10)
            stub.Reconcile(epb.ReconcileRequest(), timeout=30)
    finally:
        api.stop(0)
    calls = [e for e in logs if e["event"] == "api_call"]
    assert [e["method"] for e in calls] == [RECONCILE]
    assert (calls[0]["uid"], calls[0]["gid"], calls[0]["pid"]) == (os.geteuid(), os.getegid(), os.getpid())
    assert calls[0]["caller"] == f"uid:{os.geteuid()}"


def test_over_tcp_the_caller_is_its_peer_address(make_engine: Make) -> None:
    """Loopback TCP stays an option: a mutating call is logged with the peer's address (no uid to read)."""
    api = start_api(make_engine([]), "127.0.0.1:0")
    try:
        with capture_logs() as logs, grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            epb_grpc.ExecutorServiceStub(channel).Reconcile(epb.ReconcileRequest(), timeout=30)
    finally:
        api.stop(0)
    calls = [e for e in logs if e["event"] == "api_call"]
    assert len(calls) == 1 and calls[0]["caller"] == "ip:127.0.0.1" and calls[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert "uid" not in calls[0]


def test_over_mutual_tls_the_caller_is_its_certificate(make_engine: Make, pki: Pki) -> None:
    """Remote mutual TLS stays an option: the caller is the name its client certificate carries."""
    api = start_api(make_engine([]), "127.0.0.1:0",
                    tls=ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    credentials = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(pki.client_key).read_bytes(),
                                               Path(pki.client_cert).read_bytes())
    try:
        with capture_logs() as logs, grpc.secure_channel(f"127.0.0.1:{api.port}", credentials) as channel:
            epb_grpc.ExecutorServiceStub(channel).Reconcile(epb.ReconcileRequest(), timeout=30)
    finally:
        api.stop(0)
    calls = [e for e in logs if e["event"] == "api_call"]
    assert len(calls) == 1 and calls[0]["caller"] == "tls:executor", calls


def test_a_call_that_reaches_the_backend_without_the_socket_is_refused(sock_dir: Path, make_engine: Make) -> None:
    """gRPC serves a private socket (a 0700 directory) the front relays to; a call found there that did not
    come through the front has no kernel-named caller and is refused."""
    path = sock_dir / "executor.sock"
    api = start_api(make_engine([]), f"unix:{path}")
    try:
        assert api.front is not None
        backend = api.front.backend
        assert stat.S_IMODE(Path(backend).parent.stat().st_mode) == 0o700
        with grpc.insecure_channel(f"unix:{backend}") as channel, pytest.raises(grpc.RpcError) as info:
            epb_grpc.ExecutorServiceStub(channel).Reconcile(epb.ReconcileRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        api.stop(0)


# --- 3. rate buckets per caller -----------------------------------------------------------------------------------

def test_rate_buckets_are_per_key_and_bounded() -> None:
    """One key's burst spent leaves another's whole; the table holds max_keys, the least recently used go."""
    buckets = RateBuckets(rate=0.001, burst=3, max_keys=4)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert [buckets.take("b") for _ in range(4)] == [True, True, True, False]
    assert not buckets.take("a")  # still spent: a's refusal did not forget it
    for key in "cde":
        buckets.take(key)
    assert buckets.keys_held() == ["a", "c", "d", "e"] and len(buckets) == 4  # b was the least recently used
    assert buckets.take("b")  # forgotten, it starts again full


def test_a_junk_flood_from_one_caller_leaves_anothers_valid_op_accepted(
        fakepve: Any, make_engine: Make, tmp_path: Path, sock_dir: Path) -> None:
    """Row 54: one desk, served on loopback TCP and on the socket. While a junk SubmitOp flood over TCP keeps
    its caller's bucket empty, the operator's valid op over the socket is accepted (and runs)."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path = sock_dir / "executor.sock"
    tcp = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    local = start_api(desk.engine, f"unix:{path}", desk=desk.desk)
    stop, started = threading.Event(), threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            flooding = pool.submit(flood, f"127.0.0.1:{tcp.port}", stop.is_set, started.set)
            try:
                assert started.wait(30), "the flood never reached its limit"
                with grpc.insecure_channel(f"unix:{path}") as channel:
                    answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(
                        epb.SubmitOpRequest(op=to_proto(envelope)), timeout=10)
            finally:
                stop.set()
            counts = flooding.result(30)
    finally:
        tcp.stop(0)
        local.stop(0)
    assert answer.decision == "accepted", answer
    assert counts["answered"] >= 20 and counts["exhausted"] >= 1
    desk.settle()
    assert "s1" in fakepve.vm(100).snapshots


FLOODER = """
import json, os, sys
from tests.test_api_socket import flood
target, stop = sys.argv[1], sys.argv[2]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
counts = flood(target, lambda: os.path.exists(stop), lambda: print("flooding", flush=True))
print(json.dumps({"uid": os.getuid(), **counts}), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a second uid needs root to drop to")
def test_a_flood_from_another_uid_on_the_socket_leaves_roots_op_accepted(
        fakepve: Any, make_engine: Make, tmp_path: Path, sock_dir: Path) -> None:
    """The same over one socket with two real uids: a process that dropped to nobody floods, root's valid op
    is accepted; the log names the flooder's uid."""
    add_vm(fakepve, 100)
    desk = open_desk(make_engine, tmp_path)
    envelope = desk.sign(desk.propose(100, "snapshot.create", snapname="s1"), "alice", role="operator")
    path, stop = sock_dir / "executor.sock", sock_dir / "stop"
    api = start_api(desk.engine, f"unix:{path}", desk=desk.desk, socket_group=grp.getgrgid(65534).gr_name)
    child = subprocess.Popen([sys.executable, "-c", FLOODER, f"unix:{path}", str(stop)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        with capture_logs() as logs:
            try:
                assert child.stdout is not None and child.stdout.readline() == "flooding\n", child.stderr
                with grpc.insecure_channel(f"unix:{path}") as channel:
                    answer = epb_grpc.ExecutorServiceStub(channel).SubmitOp(
                        epb.SubmitOpRequest(op=to_proto(envelope)), timeout=10)
            finally:
                stop.touch()
            out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        api.stop(0)
    assert child.returncode == 0, err
    report = json.loads(out)
    assert report["uid"] == 65534 and report["answered"] >= 20 and report["exhausted"] >= 1
    assert answer.decision == "accepted", answer
    uids = {e.get("uid") for e in logs if e["event"] == "api_call" and e["method"] == SUBMIT}
    assert uids == {65534, 0}


# --- 4. the before-image -----------------------------------------------------------------------------------------

def test_propose_answers_only_the_keys_the_proposal_touches(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """Row 54: ProposeOp for a detach of scsi1 on a guest with a description and a cloud-init user answers
    scsi1's value and the digest it binds, nothing else of the config."""
    add_vm(fakepve, 100, description="root password is in the vault, ask carol", ciuser="admin",
           sshkeys="ssh-ed25519%20AAAA")
    desk = open_desk(make_engine, tmp_path)
    _, digest = desk.engine.pve.config("qemu", 100)
    api = start_api(desk.engine, "127.0.0.1:0", desk=desk.desk)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
            answer = epb_grpc.ExecutorServiceStub(channel).ProposeOp(epb.ProposeOpRequest(
                vmid=100, kind="config.disk_detach", params_json=json.dumps({"delete": ["scsi1"]})), timeout=10)
    finally:
        api.stop(0)
    assert dict(answer.before) == {"scsi1": "local-lvm:vm-100-disk-1,size=4G", "digest": digest}
    text = answer.SerializeToString()
    for secret in (b"vault", b"admin", b"ssh-ed25519"):
        assert secret not in text


def test_a_resize_proposal_shows_the_disk_it_resizes(fakepve: Any, make_engine: Make, tmp_path: Path) -> None:
    """A kind whose params name a disk shows that disk's line (the signer sees which volume grows)."""
    add_vm(fakepve, 100, description="private")
    desk = open_desk(make_engine, tmp_path)
    proposal = desk.propose(100, "disk.resize", disk="scsi0", size=8 << 30)
    assert set(proposal.before) == {"scsi0", "digest"}


# --- 5. the commands and the health check reach the socket ----------------------------------------------------------

def test_the_commands_and_the_health_check_reach_a_socket(sock_dir: Path, capsys: pytest.CaptureFixture[str],
                                                          make_engine: Make) -> None:
    """``pending --api unix:PATH`` (and PVE_EXECUTOR_API) and ``pve-healthcheck unix:PATH`` reach the API."""
    from executor import cli as executor_cli  # noqa: PLC0415

    path = sock_dir / "executor.sock"
    api = start_api(make_engine([Declared(vmid=100, state="running")]), f"unix:{path}")
    capsys.readouterr()  # the daemon's own log lines
    try:
        assert executor_cli.main(["pending", "--api", f"unix:{path}", "--timeout", "10"]) == 0
        assert capsys.readouterr().out == "nothing pending\n"
        env = run_module("executor", "pending", env={opcli.API_ENV: f"unix:{path}"})
        assert (env.returncode, env.stdout) == (0, "nothing pending\n"), env.stderr
        checked = run_module("common.healthcheck", env={"PVE_HEALTH_ADDRESS": f"unix:{path}"})
        assert (checked.returncode, checked.stdout.strip()) == (0, "SERVING"), checked.stderr
    finally:
        api.stop(0)


def test_grpcserver_serves_a_socket_for_any_service(sock_dir: Path) -> None:
    """The front is service plumbing: the planner's server could serve a socket the same way."""
    path = sock_dir / "p.sock"
    running = grpcserver.start(f"unix:{path}", lambda _server: None, ())
    try:
        assert health(f"unix:{path}") == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(0)


def test_the_shipped_unit_and_image_make_the_socket_directory() -> None:
    """systemd makes /run/pve-reconcile (0750) for the service and runs it in the pve-reconcile group; the
    image makes the directory for its user and its health check can name the socket."""
    unit = (ROOT / "deploy" / "systemd" / "pve-reconcile-executor.service").read_text()
    for directive in ("RuntimeDirectory=pve-reconcile", "RuntimeDirectoryMode=0750", "Group=pve-reconcile"):
        assert directive in unit.splitlines(), directive
    image = (ROOT / "Dockerfile").read_text()
    assert "/run/pve-reconcile" in image and "PVE_HEALTH_ADDRESS=unix:/run/pve-reconcile/executor.sock" in image
