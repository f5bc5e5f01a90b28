"""Helpers of the signed-op end-to-end and matrix tests: a trust store for fakepve's node, an in-process
desk (a real engine, gate, journal and OpDesk), signing with the CLI's own payload builder, the journal
read from disk while a daemon holds it, and a hold on one fakepve request (to kill a daemon mid-call).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor.app.wiring import Parts
from executor.gate.decisions import Refusal
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.loop.queue import Job
from executor.signed.desk import IssuedProposal, OpDesk, OpSettings
from executor.v1 import executor_pb2 as epb
from executor.v1 import executor_pb2_grpc as epb_grpc
from journal import BURN_PREFIX, Applied, Begun, NonceSpentError, Record, segments
from journal.records import record_of, scan
from opctl.api import to_proto
from opctl.doc import Proposal
from opctl.sign import build_payload
from safety import signedop
from safety.signedop import Envelope
from tests.executor_helpers import ROOT, LineReader, cli
from tests.signing import key_entry, kid, private, to_toml, write_store

AUDIENCE = "pve1@fakecluster"  # fakepve's node pve1 in its cluster "fakecluster"
DESTROYER_KINDS = ["config.disk_detach", "config.unused_delete", "guest.destroy", "snapshot.delete",
                   "snapshot.rollback"]
OPERATOR_KINDS = ["config.disk_attach", "config.nic_identity", "config.protection_off", "disk.resize", "op.revoke",
                  "snapshot.create", "start", "stop"]
GiB = 1 << 30


def roles(audience: str = AUDIENCE) -> list[dict[str, Any]]:
    """destroyer (DESTRUCTIVE kinds, threshold 2, 1 h, vmids 100-199) and operator (APPROVAL, threshold 1, 4 h)."""
    return [
        {"name": "destroyer", "kinds": DESTROYER_KINDS, "classes": ["DESTRUCTIVE"], "audiences": [audience],
         "vmids": ["100-199"], "max_ttl": "1h", "threshold": 2},
        {"name": "operator", "kinds": OPERATOR_KINDS, "classes": ["APPROVAL"], "audiences": [audience],
         "vmids": ["100-199"], "max_ttl": "4h", "threshold": 1},
    ]


def store_doc() -> dict[str, Any]:
    """alice (destroyer, operator) and bob (destroyer), the deterministic test keys of tests.signing."""
    return {"version": 1, "roles": roles(),
            "keys": [key_entry("alice", ["destroyer", "operator"]), key_entry("bob", ["destroyer"])]}


@dataclass(slots=True)
class Desk:
    """An in-process executor: a real engine (fakepve over HTTPS, real planner, real journal) and its OpDesk."""

    engine: Engine
    desk: OpDesk
    state_dir: Path

    def propose(self, vmid: int, kind: str, **params: Any) -> IssuedProposal:
        """ProposeOp, in process."""
        return self.desk.propose(vmid, kind, params)

    def sign(self, proposal: IssuedProposal | Proposal, *signers: str, role: str, ttl: int = 900,
             now: float | None = None) -> Envelope:
        """The payload ``op sign`` builds from ``proposal`` (signed ``now``), signed by the named test keys."""
        unsigned = proposal if isinstance(proposal, Proposal) else unsigned_of(proposal)
        data = build_payload(unsigned, role=role, ttl=ttl, reason="test", now=time.time() if now is None else now)
        return seal(data, *signers)

    def submit(self, envelope: Envelope) -> tuple[str, Refusal | None]:
        """SubmitOp, in process."""
        return self.desk.submit(envelope)

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until the lanes ran (or refused) every op queued (an op ends in its lane's job)."""
        assert self.engine.queue.wait_idle(timeout), "the lanes never finished"

    def run(self, envelope: Envelope) -> tuple[str, Refusal | None]:
        """Submit and wait for the lane."""
        result = self.submit(envelope)
        self.settle()
        return result

    def records(self) -> list[Record]:
        """The journal's recent records, oldest first."""
        journal = self.engine.journal
        assert journal is not None
        return journal.recent(1000)


def unsigned_of(proposal: IssuedProposal) -> Proposal:
    """A ProposeOp answer as the document ``op sign`` reads."""
    return Proposal(action=json.loads(proposal.action), challenge=proposal.challenge or None)


def seal(payload: bytes, *signers: str) -> Envelope:
    """An envelope over ``payload`` signed by the named test keys."""
    signatures = tuple(signedop.Signature(keyid=kid(name),
                                          sig=private(name).sign(signedop.pae(signedop.PAYLOAD_TYPE, payload)))
                       for name in signers)
    return Envelope(payload_type=signedop.PAYLOAD_TYPE, payload=payload, signatures=signatures)


def open_desk(make_engine: Callable[..., Engine], tmp_path: Path, declared: list[Declared] | None = None, *,
              journal: bool = True, journal_dir: Path | None = None, **settings: Any) -> Desk:
    """An engine from the ``make_engine`` fixture with an OpDesk, built by ``wiring.assemble`` as the daemon's.

    The state dir is the journal's directory (``journal_dir``: open the journal there; the caller closes it
    if the gate drops it); the gate's secret is state_dir/gate.secret, none without a journal; the gate's
    wall clock is the desk's GateClock (never before the journal's high-water mark).
    """
    def settings_for(state_dir: Path) -> OpSettings:
        trust = write_store(tmp_path, store_doc(), name=f"trust-{state_dir.name}.toml")
        return OpSettings(state_dir=str(state_dir), trust_store=str(trust))

    built: list[Parts] = []
    engine = make_engine(declared or [], journal=journal, journal_dir=journal_dir, desk=settings_for, parts=built,
                         **settings)
    (parts,) = built
    assert parts.desk is not None
    return Desk(engine=engine, desk=parts.desk, state_dir=Path(parts.desk.settings.state_dir))


def trust_toml(entries: dict[str, str], audience: str = AUDIENCE) -> str:
    """A trust store from the [[keys]] entries ``keys generate`` printed: alice (destroyer, operator), bob."""
    granted = {"alice": '["destroyer", "operator"]', "bob": '["destroyer"]'}
    keys = [entries[name].replace("roles = []", f"roles = {granted[name]}") for name in ("alice", "bob")]
    return "\n".join([to_toml({"version": 1, "roles": roles(audience)}), *keys])


def hold_lane(desk: Desk, vmid: int) -> threading.Event:
    """Keep the guest's lane busy (a job ahead of the op) until the returned event is set."""
    gate = threading.Event()
    desk.engine.queue.submit(Job(vmid=vmid, run=lambda: gate.wait(20), label="held"))
    return gate


# --- the journal on disk ----------------------------------------------------------------------------

def op_refusal(journal: Any, op_id: str) -> tuple[str, str] | None:
    """(reason, detail) of the last refusal of a signed op under ``op_id`` (its own, not a replay's), if any."""
    own = [r for r in journal.refusals_of(op_id) if (r.key or "").endswith(":refused")]
    return (own[-1].reason, own[-1].detail) if own else None


def records_on_disk(directory: Path) -> list[Record]:
    """Every record in the journal's segment files as they are on disk now (no lock taken: a daemon may hold it)."""
    found: list[Record] = []
    for sequence in segments.sequences(directory):
        data = (directory / segments.name(sequence)).read_bytes()
        scan(data, lambda body: found.append(record_of(body)))
    return found


def journal_files(directory: Path) -> dict[str, bytes]:
    """The journal directory's files and their bytes (to prove nothing was written)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --- holding one request in fakepve --------------------------------------------------------------------

class HeldRequest(list[Any]):
    """fakepve's request list, but the first request matching (method, path suffix) is held once recorded.

    fakepve records a request before it acts on it. Holding there (in fakepve's own thread) keeps Proxmox
    from acting until ``release``: the client's call is out on the wire, unanswered, the instant a test
    kills the client. ``seen`` is set when the request arrives.
    """

    def __init__(self, fakepve: Any, method: str, suffix: str, timeout: float = 30.0) -> None:
        super().__init__(fakepve.requests)
        self._match, self._timeout = (method, suffix), timeout
        self.seen, self._released = threading.Event(), threading.Event()
        fakepve.requests = self

    def append(self, item: Any) -> None:
        """Record the request; hold it if it is the one (only the first time)."""
        super().append(item)
        method, path = item[0], item[1]
        if not self.seen.is_set() and method == self._match[0] and path.endswith(self._match[1]):
            self.seen.set()
            self._released.wait(self._timeout)

    def release(self) -> None:
        """Let fakepve act on the held request."""
        self._released.set()


# --- guests and what happened to them --------------------------------------------------------------------

def add_vm(fakepve: Any, vmid: int, *, disks: int = 2, status: str = "stopped", **config: Any) -> Any:
    """A QEMU guest with ``disks`` 4 GiB volumes on local-lvm as scsi0.. (real volumes, so a destroy frees them)."""
    volumes = fakepve.storages["local-lvm"].setdefault("volumes", {})
    for n in range(disks):
        volumes[f"vm-{vmid}-disk-{n}"] = {"content": "images", "format": "raw", "size": 4 * GiB, "vmid": vmid,
                                          "ctime": 0}
        config.setdefault(f"scsi{n}", f"local-lvm:vm-{vmid}-disk-{n},size=4G")
    return fakepve.add_vm(vmid, f"vm{vmid}", status=status,
                          config={"cores": 2, "smbios1": f"uuid=00000000-0000-4000-8000-{vmid:012d}", **config})


def mutations(fakepve: Any, since: int = 0) -> list[tuple[str, str]]:
    """(method, path) of every mutating request fakepve received from index ``since`` (logins aside)."""
    return [(m, p) for m, p, _ in fakepve.requests[since:] if m in ("POST", "PUT", "DELETE") and "/access/" not in p]


def spent(desk: Desk, op_id: str) -> bool:
    """Whether the op's nonce is spent (its ``op:<op_id>:<payload>`` key ended in the journal, whatever the outcome):
    begun and ended, or burned without a begin (an op refused because the guest is not in its signed state)."""
    journal = desk.engine.journal
    assert journal is not None
    prefix = f"{BURN_PREFIX}{op_id}:"
    keys = {r.key for r in journal.recent(10_000)
            if isinstance(r, Begun | Applied) and r.key and r.key.startswith(prefix)}
    for key in keys:
        try:
            journal.check_key(key)
        except NonceSpentError:
            return True
    return False


# --- the daemon and the operator's commands as processes -------------------------------------------------

def operator(*args: str, cwd: Path, api: int | None = None) -> subprocess.Popen[str]:
    """``python -m executor ARGS`` started in ``cwd`` (its own session: no terminal), the API on port ``api``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if api is not None:
        env["PVE_EXECUTOR_API"] = f"127.0.0.1:{api}"
    return subprocess.Popen([sys.executable, "-m", "executor", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def done(*children: subprocess.Popen[str]) -> list[subprocess.CompletedProcess[str]]:
    """Wait for operator commands started together (they run in parallel); their results in order."""
    results = []
    for child in children:
        out, err = child.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(child.args, child.returncode, out, err))
    return results


def ok(*children: subprocess.Popen[str]) -> list[str]:
    """Wait for the commands; each must exit 0; their standard outputs."""
    results = done(*children)
    for result in results:
        assert result.returncode == 0, f"{result.args[3:]}: {result.stdout}{result.stderr}"
    return [result.stdout for result in results]


class Daemon:
    """``pve-executor run`` as a child process: its API on a loopback port, its JSON log, SIGKILL or SIGTERM."""

    def __init__(self, command: list[str], port: int) -> None:
        self.port = port
        self.child = subprocess.Popen([*command, "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.child.stderr is not None
        self.log = LineReader(self.child.stderr)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.api = epb_grpc.ExecutorServiceStub(self._channel)

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until the API answers SERVING: it is up and recovery has ended."""
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            assert self.child.poll() is None, f"the daemon exited {self.child.returncode}"
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the daemon never served"
            time.sleep(0.05)

    def events(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Its log events named ``name``, once there is at least one (the log is read by a thread)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.log.events(timeout=0) if e.get("event") == name]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        self.child.send_signal(signal.SIGKILL)
        self.child.wait(10)

    def stop(self) -> int:
        """SIGTERM; its exit status (within 15 s, else a failure that shows its last log lines)."""
        self.child.send_signal(signal.SIGTERM)
        try:
            return self.child.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("the daemon did not exit within 15 s of SIGTERM; its last log lines:\n"
                                 + "".join(self.log.lines[-20:])) from None

    def close(self) -> None:
        """Kill it if it still runs; close the channel."""
        if self.child.poll() is None:
            self.kill()
        self._channel.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def api_propose(api: epb_grpc.ExecutorServiceStub, vmid: int, kind: str, **params: Any) -> Proposal:
    """ProposeOp over the API: the document ``op sign`` signs."""
    response = api.ProposeOp(epb.ProposeOpRequest(vmid=vmid, kind=kind, params_json=json.dumps(params)), timeout=10)
    return Proposal(action=json.loads(response.action), challenge=response.challenge or None)


def api_submit(api: epb_grpc.ExecutorServiceStub, envelope: Envelope) -> tuple[str, str]:
    """SubmitOp over the API: (decision, refusal reason without its prefix)."""
    response = api.SubmitOp(epb.SubmitOpRequest(op=to_proto(envelope)), timeout=10)
    return response.decision, epb.RefusalReason.Name(response.refusal.reason).removeprefix("REFUSAL_REASON_")


def signed_by(unsigned: Proposal, *signers: str, role: str, ttl: int = 900) -> Envelope:
    """``unsigned`` signed now by the named test keys (tests.signing), as ``op sign`` builds the payload."""
    return seal(build_payload(unsigned, role=role, ttl=ttl, reason="test", now=time.time()), *signers)


def run_command(fakepve: Any, cafile: str, planner_port: int, tmp_path: Path, *extra: str) -> list[str]:
    """``pve-executor run`` against the fixtures with the test trust store (alice, bob) and state in tmp_path."""
    trust = tmp_path / "trust-daemon.toml"
    if not trust.exists():
        write_store(tmp_path, store_doc(), name=trust.name)
    return cli(f"https://127.0.0.1:{fakepve.port}", cafile, f"127.0.0.1:{planner_port}", tmp_path, "run",
               "--trust-store", str(trust), "--state-dir", str(tmp_path / "state"), "--interval", "30", *extra)
