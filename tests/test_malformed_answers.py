"""A Proxmox answer that does not parse: the guest is skipped and named, the rest of the node converges.

fakepve serves real guests over HTTPS; ``AnswerFaults`` rewrites one answer on the wire (a string
where a guest-list entry belongs, a config value of the wrong type, a config without its digest, a
config that is a list). Nothing crashes the tick or the daemon, a guest whose facts could not be
read gets no write (no digest, no write), and every other guest converges.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.app import daemon
from executor.gate.actions import SET_CONFIG, Step
from executor.gate.decisions import declaration_of
from executor.gate.gate import Gate
from executor.loop.desired import Declared
from executor.loop.engine import Engine
from executor.loop.observe import Observed
from executor.pve.node import GuestState, ProxmoxNode, PveError
from planner import server
from safety.classify import Source
from tests.answer_faults import AnswerFaults
from tests.executor_helpers import ROOT, cli, mutations, run_daemon_until

Make = Callable[..., Engine]
MEMORY = {"memory": "4096"}


def _without(key: str) -> Callable[[Any], Any]:
    return lambda data: {k: v for k, v in data.items() if k != key}


def _with(key: str, value: Any) -> Callable[[Any], Any]:
    return lambda data: {**data, key: value}


# Each corrupts one guest's config answer; the guest declares a benign memory change.
BAD_CONFIGS: dict[int, tuple[str, Callable[[Any], Any]]] = {
    101: ("a NIC as an object", _with("net0", {"virtio": "BC:24:11:00:00:01", "bridge": "vmbr0"})),
    102: ("no digest", _without("digest")),
    103: ("a list, not an object", lambda data: ["memory", "2048"]),
    104: ("a value that is null", _with("cores", None)),
    105: ("a digest that is a number", _with("digest", 12345)),
    106: ("a key that is not PVE's", _with("Memory ", "1")),
}


def _node_with_bad_answers(fakepve: Any) -> AnswerFaults:
    """Guests 100-106 stopped with 2048 MB; 100 and 107 answer well, 101-106 as ``BAD_CONFIGS``."""
    for vmid in range(100, 108):
        fakepve.add_vm(vmid, f"g{vmid}", status="stopped", config={"memory": "2048", "cores": 1,
                                                                   "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    faults = AnswerFaults(fakepve)
    for vmid, (_, change) in BAD_CONFIGS.items():
        faults.rewrite("GET", f"/qemu/{vmid}/config", change)
    return faults


def _config_writes(fakepve: Any, vmid: int) -> list[Any]:
    return [r for r in mutations(fakepve) if r[1].endswith(f"/qemu/{vmid}/config")]


def test_a_guest_whose_config_does_not_parse_gets_no_write_and_the_rest_converge(fakepve: Any,
                                                                                 make_engine: Make) -> None:
    """Each malformed config is skipped (CONFIG_UNKNOWN, the error logged by name); 100 and 107 converge."""
    _node_with_bad_answers(fakepve)
    engine = make_engine([Declared(vmid=v, config=MEMORY) for v in range(100, 108)])
    for _ in range(3):
        summary = engine.tick(wait=True)
        assert summary.skipped == len(BAD_CONFIGS)
    for vmid in BAD_CONFIGS:
        assert not _config_writes(fakepve, vmid), f"guest {vmid} ({BAD_CONFIGS[vmid][0]}) was written"
        assert fakepve.vm(vmid).config["memory"] == "2048"
    assert fakepve.vm(100).config["memory"] == fakepve.vm(107).config["memory"] == "4096"


@pytest.mark.parametrize("vmid", sorted(BAD_CONFIGS))
def test_a_config_answer_that_does_not_parse_is_a_pve_error_naming_the_guest(fakepve: Any, node: ProxmoxNode,
                                                                            vmid: int) -> None:
    """The adapter refuses the answer with an error that names the guest and what was wrong."""
    _node_with_bad_answers(fakepve)
    with pytest.raises(PveError, match=f"guest {vmid}"):
        node.config("qemu", vmid)


def test_a_guest_list_entry_that_is_not_an_object_is_dropped_and_the_rest_converge(fakepve: Any,
                                                                                   make_engine: Make) -> None:
    """A string in the guest list is dropped with a warning; an entry with a bad field names its guest and
    that guest is skipped; the others converge."""
    for vmid in (100, 101, 102):
        fakepve.add_vm(vmid, f"g{vmid}", status="stopped", config={"memory": "2048"})
    faults = AnswerFaults(fakepve)
    faults.rewrite("GET", "/nodes/pve1/qemu", lambda data: [
        "garbage", 7, *[{**e, "status": ["running"]} if e.get("vmid") == 101 else e for e in data]])
    engine = make_engine([Declared(vmid=v, state="running", config=MEMORY) for v in (100, 101, 102)])
    summary = engine.tick(wait=True)
    assert summary.skipped == 1
    assert fakepve.vm(100).status == fakepve.vm(102).status == "running"
    assert fakepve.vm(101).status == "stopped" and not [r for r in mutations(fakepve) if "/101/" in r[1]]
    listed = node_guests(engine)
    assert sorted(listed) == [100, 102]


def node_guests(engine: Engine) -> list[int]:
    """The vmids the engine's reader lists (the malformed entries left out)."""
    return [g.vmid for g in engine.pve.guests()]


def test_the_gate_admits_no_config_write_without_a_digest(fakepve: Any, node: ProxmoxNode) -> None:
    """Facts without a digest (a config that could not be read) admit no config write, whatever the planner
    sends (with a digest of its own, or none)."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": "2048"})
    gate = Gate(reader=node, writer=None, dry_run=True)
    guest = GuestState(vmid=100, type="qemu", status="stopped", lock="")
    for config in ({"memory": "2048"}, None):
        observed = Observed(guests={100: guest}, configs={100: (config, "")} if config else {}, elsewhere=frozenset())
        for digest in ("", "a" * 40):
            step = Step(vmid=100, guest_type="qemu", kind=SET_CONFIG, set=(("memory", "4096"),), digest=digest)
            admission = gate.admit({100: [step]}, observed=observed, source=Source.LOCAL_FILE, record=False,
                                   declared={100: declaration_of(100, None, MEMORY, None)})
            assert not admission.admitted, (config, digest)
            if config is not None:  # without a config the scope check may speak first
                assert [r.reason for r in admission.refused] == ["DIGEST_STALE"]


def test_the_daemon_survives_malformed_answers_and_converges_the_rest(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """A running daemon: garbage in the guest list and six malformed configs; it keeps ticking, writes none
    of the malformed guests, names each in its log, and converges 100 and 107."""
    faults = _node_with_bad_answers(fakepve)
    faults.rewrite("GET", "/nodes/pve1/qemu", lambda data: [*data, "garbage", {"vmid": "x"}])
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n" + "".join(f"  - vmid: {v}\n    config:\n      memory: '4096'\n"
                                             for v in range(100, 108)))
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "run", "--desired", str(desired), "--state-dir", str(tmp_path / "state"))
    log = run_daemon_until([*command, "--interval", "0.2", "--listen", "127.0.0.1:0"],
                           lambda lines: sum('"event": "tick"' in line for line in lines) >= 5,
                           timeout=30, what="too few ticks")
    for vmid in BAD_CONFIGS:
        assert not _config_writes(fakepve, vmid), f"guest {vmid} ({BAD_CONFIGS[vmid][0]}) was written"
    assert fakepve.vm(100).config["memory"] == fakepve.vm(107).config["memory"] == "4096"
    events = log.events()
    named = {e.get("vmid") for e in events if e["event"] == "config_unreadable"}
    assert named >= set(BAD_CONFIGS)
    assert any(e["event"] == "pve_entry_dropped" for e in events)
    assert not any(e.get("log_level") == "error" or "Traceback" in str(e) for e in events)


def test_plan_names_a_guest_whose_entry_does_not_parse(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                                       tmp_path: Path) -> None:
    """`pve-executor plan` (the dry run, same read path) shows the unreadable guest, skipped with its error."""
    for vmid in (100, 101):
        fakepve.add_vm(vmid, f"g{vmid}", status="stopped")
    AnswerFaults(fakepve).rewrite("GET", "/nodes/pve1/qemu", lambda data: [
        {**e, "lock": 7} if e.get("vmid") == 101 else e for e in data])
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n  - vmid: 101\n    state: running\n")
    base = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path, "plan")
    text = subprocess.run([*base, "--desired", str(desired)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False).stdout
    assert "guest 100: start" in text
    assert "guest 101: SKIPPED UNREADABLE\n    qemu guest-list entry: lock is an integer, not a string" in text
    body = json.loads(subprocess.run([*base, "--json", "--desired", str(desired)], cwd=ROOT, capture_output=True,
                                     text=True, timeout=60, check=False).stdout)
    assert [a["vmid"] for a in body["steps"]] == [100]
    assert [(s["vmid"], s["reason"]) for s in body["skipped"]] == [(101, "UNREADABLE")]


def test_a_tick_that_raises_never_ends_the_daemons_loop(fakepve: Any, make_engine: Make,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in one tick (any exception) is logged and counted; the loop goes on to the next tick."""
    engine = make_engine([])
    stop = threading.Event()
    calls: list[int] = []

    def tick(*, wait: bool = False) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        stop.set()

    monkeypatch.setattr(engine, "tick", tick)
    daemon._loop(engine, stop, 0.01)
    assert len(calls) == 2
    assert engine.metrics.ticks.labels("crashed")._value.get() == 1
