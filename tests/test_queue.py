"""The per-guest serializer queue: order per guest, parallelism across guests, fairness, closing."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from executor.loop.queue import GuestQueue, Job, QueueClosedError


def test_same_guest_runs_strictly_in_submit_order_one_at_a_time() -> None:
    """Jobs of one vmid never overlap and run in the order submitted."""
    queue, log, active = GuestQueue(4), [], []

    def job(n: int) -> Job:
        def run() -> None:
            active.append(n)
            assert len(active) == 1, "two jobs of one guest overlapped"
            time.sleep(0.005)
            log.append(n)
            active.remove(n)
        return Job(vmid=100, run=run)

    for n in range(20):
        queue.submit(job(n))
    assert queue.wait_idle(10)
    assert log == list(range(20))


def test_different_guests_run_in_parallel_up_to_the_bound() -> None:
    """Eight guests with a 0.2 s job each, four at a time: about 0.4 s, never more than four at once."""
    queue, lock, running, peak = GuestQueue(4), threading.Lock(), [0], [0]

    def run() -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1

    started = time.monotonic()
    for vmid in range(100, 108):
        queue.submit(Job(vmid=vmid, run=run))
    assert queue.wait_idle(10)
    assert peak[0] == 4
    assert time.monotonic() - started < 0.75


def test_submit_never_blocks_and_busy_reports_depths() -> None:
    """Submitting behind a long job returns at once; busy() shows what is queued per guest."""
    queue, gate = GuestQueue(1), threading.Event()
    queue.submit(Job(vmid=100, run=gate.wait))
    started = time.monotonic()
    for _ in range(50):
        queue.submit(Job(vmid=100, run=lambda: None))
    queue.submit(Job(vmid=101, run=lambda: None))
    assert time.monotonic() - started < 0.1
    assert queue.busy() == {100: 51, 101: 1}
    gate.set()
    assert queue.wait_idle(10) and queue.busy() == {}


def test_oldest_waiting_lane_goes_first_so_none_starves() -> None:
    """With one worker, a lane with many jobs does not starve a guest that queued later."""
    queue, gate = GuestQueue(1), threading.Event()
    order: list[tuple[int, int]] = []
    queue.submit(Job(vmid=100, run=gate.wait))
    for n in range(3):
        queue.submit(Job(vmid=100, run=functools.partial(order.append, (100, n))))
    queue.submit(Job(vmid=200, run=lambda: order.append((200, 0))))
    gate.set()
    assert queue.wait_idle(10)
    assert order.index((200, 0)) < order.index((100, 1))


def test_a_failing_job_does_not_stop_its_lane() -> None:
    """An exception is reported and the next job of that guest still runs."""
    errors, ran = [], []
    queue = GuestQueue(2, on_error=lambda job, exc: errors.append((job.vmid, str(exc))))

    def boom() -> None:
        raise RuntimeError("boom")

    queue.submit(Job(vmid=100, run=boom))
    queue.submit(Job(vmid=100, run=lambda: ran.append(1)))
    assert queue.wait_idle(10)
    assert errors == [(100, "boom")] and ran == [1]


def test_close_drains_within_grace_and_reports_the_unfinished() -> None:
    """close() lets queued work finish; what cannot finish in the grace period is reported."""
    queue, release = GuestQueue(1), threading.Event()
    queue.submit(Job(vmid=100, run=lambda: release.wait(5), label="slow"))
    queue.submit(Job(vmid=100, run=lambda: None, label="queued"))
    unfinished = queue.close(0.2)
    assert [job.label for job in unfinished] == ["slow", "queued"]
    with pytest.raises(QueueClosedError):
        queue.submit(Job(vmid=101, run=lambda: None))
    release.set()
