"""The strict parse of Proxmox answers (``executor.pve.parse``): what PVE's API promises, or MalformedAnswerError."""

from __future__ import annotations

from typing import Any

import pytest

from executor.pve import parse as pveparse
from executor.pve.parse import MalformedAnswerError

DIGEST = "0" * 40
UPID = "UPID:pve1:000003E8:00001B58:6745A1B2:qmshutdown:100:root@pam:"


@pytest.mark.parametrize(("answer", "wrong"), [
    pytest.param(["memory", "2048"], "is a list, not an object", id="a list"),
    pytest.param(None, "is null, not an object", id="null"),
    pytest.param({"memory": "2048"}, "no digest", id="no digest"),
    pytest.param({"digest": 12345}, "is not a hex SHA digest", id="numeric digest"),
    pytest.param({"digest": "z" * 40}, "is not a hex SHA digest", id="non-hex digest"),
    pytest.param({"digest": DIGEST, "net0": {"virtio": "BC:24:11:00:00:01"}}, "net0 is an object", id="object value"),
    pytest.param({"digest": DIGEST, "cores": None}, "cores is null", id="null value"),
    pytest.param({"digest": DIGEST, "cores": [1]}, "cores is a list", id="list value"),
    pytest.param({"digest": DIGEST, "cpulimit": float("nan")}, "cpulimit is a number", id="NaN"),
    pytest.param({"digest": DIGEST, "Memory ": "1"}, "is not a PVE config key", id="odd key"),
    pytest.param({"digest": DIGEST, "lxc": [["lxc.cap.drop"]]}, "not a \\[key, value\\] pair", id="raw lxc, no value"),
])
def test_a_config_answer_that_is_not_what_pve_promises_is_malformed(answer: Any, wrong: str) -> None:
    """Each names what was wrong; none becomes a fact."""
    with pytest.raises(MalformedAnswerError, match=wrong.replace("(", r"\(")):
        pveparse.config_answer(answer)


def test_a_config_answer_reads_as_text_with_its_digest() -> None:
    """Numbers as they read, booleans 1/0, LXC's raw keys as the file's lines, the digest apart."""
    answer = {"digest": DIGEST, "memory": 2048, "cpulimit": 0.5, "onboot": True, "name": "web",
              "lxc": [["lxc.apparmor.profile", "unconfined"], ["lxc.cap.drop", ""]]}
    config, digest = pveparse.config_answer(answer)
    assert digest == DIGEST
    assert config == {"memory": "2048", "cpulimit": "0.5", "onboot": "1", "name": "web",
                      "lxc": "lxc.apparmor.profile: unconfined\nlxc.cap.drop: "}


def test_a_guest_list_keeps_objects_and_notes_the_rest() -> None:
    """A string or a number where an entry belongs is dropped with a note; a list that is not one is malformed."""
    kept, dropped = pveparse.objects([{"vmid": 100}, "garbage", 7], "the qemu guest list")
    assert kept == [{"vmid": 100}]
    assert dropped == ["the qemu guest list[1] is a string, not an object",
                       "the qemu guest list[2] is an integer, not an object"]
    with pytest.raises(MalformedAnswerError, match="is an object, not a list"):
        pveparse.objects({"vmid": 100}, "the qemu guest list")


@pytest.mark.parametrize(("entry", "wrong"), [
    ({"vmid": "x", "status": "running"}, "is not a vmid"),
    ({"vmid": True, "status": "running"}, "is not a vmid"),
    ({"vmid": 99, "status": "running"}, "is not a vmid"),
    ({"vmid": 100, "status": ["running"]}, "is not one of"),
    ({"vmid": 100, "status": "hibernating"}, "is not one of"),
    ({"vmid": 100, "status": "running", "lock": 1}, "lock is an integer"),
    ({"vmid": 100, "status": "running", "qmpstatus": {}}, "qmpstatus is an object"),
])
def test_a_guest_list_entry_that_does_not_parse_is_malformed(entry: dict[str, Any], wrong: str) -> None:
    """Its run state or lock unknown, the guest is not a fact."""
    with pytest.raises(MalformedAnswerError, match=wrong):
        pveparse.guest_entry(entry)


def test_a_guest_list_entry_reads_paused_and_lock() -> None:
    """A running VM whose QMP status is paused is paused; lock absent or null is none."""
    assert pveparse.guest_entry({"vmid": 100, "status": "running", "qmpstatus": "paused"}) == (100, "paused", "")
    assert pveparse.guest_entry({"vmid": "101", "status": "stopped", "lock": None}) == (101, "stopped", "")
    assert pveparse.guest_entry({"vmid": 102, "status": "stopped", "lock": "backup"}) == (102, "stopped", "backup")


@pytest.mark.parametrize("answer", [
    [{"upid": UPID, "type": "qmshutdown", "id": "100", "starttime": 1}, "garbage"],
    [{"upid": "not-a-upid", "type": "qmshutdown", "id": "100", "starttime": 1}],
    [{"upid": UPID, "type": "qmshutdown", "id": "100", "starttime": "1"}],
    [{"upid": UPID, "type": 5, "id": "100", "starttime": 1}],
    {"upid": UPID},
], ids=["a string entry", "a bad upid", "a text starttime", "a numeric type", "an object"])
def test_a_task_list_with_any_entry_that_does_not_parse_is_unreadable(answer: Any) -> None:
    """A task list is evidence of absence: one dropped entry could be the task looked for."""
    with pytest.raises(MalformedAnswerError):
        pveparse.task_list(answer)


@pytest.mark.parametrize(("answer", "read"), [
    ({"status": "running", "upid": UPID}, {"status": "running"}),
    ({"status": "stopped", "exitstatus": "OK"}, {"status": "stopped", "exitstatus": "OK"}),
    ({"status": "stopped"}, {"status": "stopped", "exitstatus": ""}),
])
def test_a_task_status_reads_status_and_exit(answer: Any, read: dict[str, str]) -> None:
    """Only what the executor reads, typed."""
    assert pveparse.task_status_answer(answer) == read


@pytest.mark.parametrize("answer", [None, [], {"status": "done"}, {"status": "stopped", "exitstatus": 0}])
def test_a_task_status_that_does_not_parse_is_malformed(answer: Any) -> None:
    """A status that is neither running nor stopped, or an exit status that is not text."""
    with pytest.raises(MalformedAnswerError):
        pveparse.task_status_answer(answer)


def test_pending_snapshots_and_cluster_answers() -> None:
    """Pending entries by key; snapshots without ``current``; resources and status with bad entries dropped."""
    current, pending, deleted = pveparse.pending_answer([
        {"key": "memory", "value": 2048, "pending": "4096"}, {"key": "scsi1", "value": "x", "delete": 1}])
    assert (current, pending, deleted) == ({"memory": "2048", "scsi1": "x"}, {"memory": "4096"}, frozenset({"scsi1"}))
    with pytest.raises(MalformedAnswerError):
        pveparse.pending_answer([{"key": "memory", "pending": {"x": 1}}])
    assert pveparse.snapshot_names([{"name": "a"}, {"name": "current"}]) == ["a"]
    with pytest.raises(MalformedAnswerError):
        pveparse.snapshot_names([{"name": "a"}, "b"])
    placed, dropped = pveparse.resources_answer([{"vmid": 100, "node": "pve1"}, {"vmid": "x", "node": "pve2"},
                                                 {"id": "storage/local"}, 3])
    assert placed == {100: "pve1"} and len(dropped) == 2
    assert pveparse.cluster_name_answer(["x", {"type": "cluster", "name": "c1"}]) == ("c1", [
        "cluster status[0] is a string, not an object"])
