"""The executor against fakepve over HTTPS, a real planner and a real journal: convergence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from executor.loop.desired import Declared
from executor.loop.engine import Engine, TickOutcome
from executor.loop.planner_client import PlannerClient
from executor.pve.node import PveWriter
from journal import Outcome
from tests import executor_helpers
from tests.pve_memory import MemoryPve

Make = Callable[..., Engine]
WRITES = ("POST", "PUT", "DELETE")


def writes(fakepve: Any, vmid: int | None = None) -> list[tuple[str, str]]:
    """The mutating requests fakepve received (logins aside), optionally for one guest."""
    found = [(m, p) for m, p, _ in fakepve.requests if m in WRITES and not p.endswith("/access/ticket")]
    return [(m, p) for m, p in found if vmid is None or f"/{vmid}/" in p + "/"]


def test_converges_power_and_config_on_qemu_and_lxc(pve: MemoryPve, make_memory_engine: Make) -> None:
    """Start, stop and config changes land on both guest types; the second tick plans nothing."""
    vm = pve.add_vm(100, "web", status="stopped", config={"memory": 2048, "cores": 1,
                                                             "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    ct = pve.add_ct(101, "cache", status="running", config={"memory": 512, "hostname": "cache"})
    vm2 = pve.add_vm(102, "db", status="running", config={"memory": 1024})
    ct2 = pve.add_ct(103, "proxy", status="stopped", config={"memory": 256, "hostname": "proxy"})
    engine = make_memory_engine([
        Declared(vmid=100, state="running", config={"memory": "4096", "net0": "virtio,bridge=vmbr0"},
                 description="web tier"),
        Declared(vmid=101, state="stopped", config={"memory": "1024"}),
        Declared(vmid=102, state="stopped"),
        Declared(vmid=103, state="running", config={"onboot": "true"}, description="proxy"),
    ])
    first = engine.tick(wait=True)
    assert (first.outcome, first.queued, first.succeeded, first.failed) == (TickOutcome.OK, 7, 7, 0)
    assert (vm.status, vm.config["memory"], vm.config["description"]) == ("running", "4096", "web tier")
    assert vm.config["net0"] == "virtio=BC:24:11:00:00:01,bridge=vmbr0"  # the generated MAC kept
    assert (ct.status, str(ct.config["memory"])) == ("stopped", "1024")
    assert vm2.status == "stopped"
    assert (ct2.status, str(ct2.config["onboot"]), ct2.config["description"].strip()) == ("running", "1", "proxy")
    before = len(pve.requests)
    second = engine.tick(wait=True)
    assert (second.outcome, second.queued) == (TickOutcome.OK, 0)
    assert not [r for r in pve.requests[before:] if r[0] in WRITES]
    assert engine.counters == {("set_config", "ok"): 3, ("start", "ok"): 2, ("stop", "ok"): 2}


def test_unmanaged_guests_and_keys_are_untouched(pve: MemoryPve, make_memory_engine: Make) -> None:
    """Only declared guests and declared keys are written; nothing without a declaration."""
    vm = pve.add_vm(100, "web", status="running", config={"memory": 2048, "cores": 8, "onboot": 0})
    pve.add_vm(900, "other", status="stopped", config={"memory": 1})
    engine = make_memory_engine([Declared(vmid=100, config={"onboot": "1"})])
    assert engine.tick(wait=True).succeeded == 1
    assert writes(pve, 900) == []
    assert (vm.status, vm.config["cores"], vm.config["memory"], str(vm.config["onboot"])) == ("running", 8, 2048, "1")
    body = [b for m, p, b in pve.requests if m == "POST" and p.endswith("/qemu/100/config")]
    assert len(body) == 1 and "onboot" in str(body[0]) and "cores" not in str(body[0])


def test_nothing_declared_means_no_reads_and_no_writes(pve: MemoryPve, make_memory_engine: Make) -> None:
    """The default empty desired state performs zero mutations (and does not even read)."""
    pve.add_vm(100, "web", status="stopped")
    before = len(pve.requests)
    summary = make_memory_engine([]).tick(wait=True)
    assert (summary.outcome, summary.queued) == (TickOutcome.OK, 0)
    assert pve.requests[before:] == []


def test_locked_guest_is_skipped(pve: MemoryPve, make_memory_engine: Make) -> None:
    """A guest under a backup lock gets no request at all that would fail; it is reported skipped."""
    pve.add_vm(100, "web", status="stopped", config={"memory": 512})
    pve.snapshot_lock(100, "backup")
    summary = make_memory_engine([Declared(vmid=100, state="running", config={"memory": "1024"})]).tick(wait=True)
    assert (summary.queued, summary.skipped) == (0, 1)
    assert writes(pve, 100) == []


def test_task_error_is_counted_and_retried(pve: MemoryPve, make_memory_engine: Make) -> None:
    """A start whose task ends in error is a failed action; a later tick retries and converges."""
    vm = pve.add_vm(100, "web", status="stopped")
    vm.start_error = "start failed: could not activate storage 'nfs-down'"
    engine = make_memory_engine([Declared(vmid=100, state="running")])
    failed = engine.tick(wait=True)
    assert (failed.outcome, failed.failed) == (TickOutcome.ACTIONS_FAILED, 1)
    assert engine.counters[("start", "failed")] == 1
    assert engine.funnel.backoff[100][0] == 1
    vm.start_error = None
    time.sleep(0.01)
    assert engine.tick(wait=True).succeeded == 1
    assert vm.status == "running" and 100 not in engine.funnel.backoff


def test_failed_guest_backs_off_before_the_retry(pve: MemoryPve, make_memory_engine: Make) -> None:
    """With a backoff, the failed guest is deferred on the next tick instead of hammered."""
    vm = pve.add_vm(100, "web", status="stopped")
    vm.start_error = "boom"
    engine = make_memory_engine([Declared(vmid=100, state="running")], backoff_base=60.0)
    engine.tick(wait=True)
    again = engine.tick(wait=True)
    assert (again.queued, again.deferred) == (0, 1)


def test_shutdown_that_times_out_falls_back_to_a_forced_stop(fakepve: Any, make_engine: Make) -> None:
    """A guest ignoring ACPI past the timeout is stopped by force; without force the action fails."""
    fakepve.time_scale = 0.005
    stubborn = fakepve.add_vm(100, "web", status="running")
    stubborn.shutdown_secs = 300
    assert make_engine([Declared(vmid=100, state="stopped")], shutdown_timeout=20).tick(wait=True).succeeded == 1
    assert stubborn.status == "stopped"
    log = [t for t in fakepve.tasklog if t["type"] == "qmshutdown"][-1]["log"]
    assert any("terminating now" in line for line in log)
    polite = fakepve.add_vm(101, "db", status="running")
    polite.shutdown_secs = 300
    summary = make_engine([Declared(vmid=101, state="stopped")], shutdown_timeout=20, force_stop=False).tick(wait=True)
    assert summary.failed == 1 and polite.status == "running"


def test_stopping_a_stopped_container_is_success(pve: MemoryPve, make_memory_engine: Make) -> None:
    """PVE's "CT n not running" on a stop means the goal is reached, not a failure."""
    pve.add_ct(101, "cache", status="stopped")
    engine = make_memory_engine([])
    from executor.gate.actions import STOP, Step  # noqa: PLC0415
    from executor.gate.decisions import Admitted  # noqa: PLC0415
    from safety.classify import Class, Source, Verdict  # noqa: PLC0415

    admitted = Admitted(step=Step(vmid=101, guest_type="lxc", kind=STOP), source=Source.LOCAL_FILE,
                        verdict=Verdict(cls=Class.BENIGN, op_kind="stop", rule="stop", reasons=()))
    assert engine.gate.execute(admitted) is Outcome.OK


def test_http_5xx_and_a_flaky_network_only_delay_convergence(fakepve: Any, make_engine: Make) -> None:
    """A 500 on the guest list and dropped connections fail ticks or actions, never the daemon."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    # onboot applies at once even while running (fakepve's GET config shows no pending change)
    # A reset call may have reached PVE: it stays in flight until a task list shows it absent (lost_grace).
    engine = make_engine([Declared(vmid=100, state="running", config={"onboot": "1"})], lost_grace=0.2)
    fakepve.fail("GET", "/nodes/pve1/qemu", 500, "proxy error", times=1)
    assert engine.tick(wait=True).outcome is TickOutcome.PVE_UNAVAILABLE
    fakepve.flaky_network(drop_rate=0.2)  # every 5th request reset: a tick needs ~6 of them
    for _ in range(200):
        engine.tick(wait=True)
        if vm.status == "running" and str(vm.config.get("onboot")) == "1":
            break
    fakepve.flaky_network()
    assert vm.status == "running" and str(vm.config["onboot"]) == "1"
    assert engine.tick(wait=True).queued == 0


def test_revoked_ticket_logs_in_again(fakepve: Any, make_engine: Make) -> None:
    """After every ticket is revoked, the next request re-authenticates and the tick succeeds."""
    vm = fakepve.add_vm(100, "web", status="stopped")
    engine = make_engine([Declared(vmid=100, state="running")])
    fakepve.revoke_tickets()
    assert engine.tick(wait=True).succeeded == 1
    assert vm.status == "running"
    logins = [p for m, p, _ in fakepve.requests if p.endswith("/access/ticket")]
    assert len(logins) == 2


class ChangesBehindOurBack:
    """A writer, but an administrator edits the guest between our read and our write."""

    def __init__(self, writer: PveWriter, fakepve: Any) -> None:
        self._writer, self._fakepve = writer, fakepve

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def set_config(self, *args: Any, **kwargs: Any) -> Any:
        vm = self._fakepve.vm(args[1])
        vm.config["cores"] = 4  # someone else's edit: the digest we read is stale now
        return self._writer.set_config(*args, **kwargs)


def test_digest_mismatch_fails_the_write_and_the_next_tick_converges(pve: MemoryPve, make_memory_engine: Make) -> None:
    """A config changed between read and write is refused by PVE; re-read, re-planned, converged."""
    vm = pve.add_vm(100, "web", status="stopped", config={"memory": 512})
    racing = make_memory_engine([Declared(vmid=100, config={"memory": "2048"})],
                         writer=ChangesBehindOurBack(pve, pve))
    summary = racing.tick(wait=True)
    assert summary.failed == 1 and str(vm.config["memory"]) == "512"
    assert racing.counters[("set_config", "failed")] == 1
    assert make_memory_engine([Declared(vmid=100, config={"memory": "2048"})]).tick(wait=True).succeeded == 1
    assert (str(vm.config["memory"]), vm.config["cores"]) == ("2048", 4)


def test_planner_down_means_zero_mutations(pve: MemoryPve, make_memory_engine: Make, unused_port: int) -> None:
    """With the planner unreachable the tick reads, fails to plan, and writes nothing."""
    pve.add_vm(100, "web", status="stopped")
    engine = make_memory_engine([Declared(vmid=100, state="running")],
                         planner_client=PlannerClient(f"127.0.0.1:{unused_port}", deadline=1, attempts=2))
    summary = engine.tick(wait=True)
    assert summary.outcome is TickOutcome.PLANNER_UNAVAILABLE and "UNAVAILABLE" in summary.error
    assert writes(pve) == []


@pytest.fixture(name="unused_port")
def _unused_port() -> int:
    """A loopback port nothing listens on."""
    return executor_helpers.unused_port()


def test_same_guest_in_order_different_guests_in_parallel(fakepve: Any, make_engine: Make) -> None:
    """Per guest: config written and its task awaited before the start; across guests: 3 starts at once."""
    fakepve.time_scale = 0.01
    vmids = list(range(100, 106))
    for vmid in vmids:
        fakepve.add_vm(vmid, f"vm{vmid}", status="stopped", config={"memory": 512}).start_secs = 40  # 0.4 s
    engine = make_engine([Declared(vmid=v, state="running", config={"memory": "1024"}) for v in vmids],
                         max_parallel=3)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            running = [t for t in fakepve.tasklog if t["type"] == "qmstart" and t["status"] == "running"]
            peak[0] = max(peak[0], len(running))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    summary = engine.tick(wait=True)
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    assert summary.succeeded == 12
    assert peak[0] == 3  # parallel across guests, never beyond --max-parallel
    assert elapsed < 6 * 0.4 * 0.75  # well under the serial time
    for vmid in vmids:
        mine = [(m, p) for m, p, _ in fakepve.requests if f"/qemu/{vmid}/" in p or f":{vmid}:" in p]
        config_at = mine.index(("POST", f"/api2/json/nodes/pve1/qemu/{vmid}/config"))
        start_at = mine.index(("POST", f"/api2/json/nodes/pve1/qemu/{vmid}/status/start"))
        assert config_at < start_at
        polled = [m for m, p in mine[config_at:start_at] if m == "GET" and "qmconfig" in p]
        assert polled, f"the start of {vmid} did not wait for its config task"
