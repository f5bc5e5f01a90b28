"""Refusal reasons are spelled one way: the proto enum executor.v1.RefusalReason.

``safety.refusal.RefusalReason`` holds the proto's names without their prefix; every reason the executor spells
as a string must be one of them, so a typo fails here instead of reaching a client as UNSPECIFIED.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from structlog.testing import capture_logs

from executor.api.server import reason_to_proto
from executor.v1 import executor_pb2 as pb
from safety.refusal import RefusalReason

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "REFUSAL_REASON_"
CAPS = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
# The all-caps strings of executor/ that are not refusal reasons, and what each is.
NOT_REASONS = {
    "OK": "a PVE task's exit status",
    "WARNINGS": "a PVE task's exit status prefix",
    "PVE": "proxmoxer's service name",
    "UPID": "a NewType name",
    "FAILED": "the dry run's mark for a step that could not be authorized (never sent as a refusal)",
    "CHANGE": "plan's word for a step run would make",
    "REFUSED": "plan's word for a refused step (its reason follows)",
    "SKIPPED": "plan's word for a guest the planner left alone",
    "UNREADABLE": "plan's skip reason for a guest whose list entry did not parse",
    "NO_COLOR": "the environment variable that turns colour off",
    "ACTION_FAILED": "the fleet view's reason for a guest whose last step failed (hub.v1 GuestState.reason)",
    "IN_PROGRESS": "the fleet view's reason for a guest with a job queued or running (hub.v1 GuestState.reason)",
    **dict.fromkeys(("KEY_VALUES_MISMATCH", "CERTIFICATE_VERIFY_FAILED", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
                     "PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE",
                     "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_HANDSHAKE_FAILURE"),
                    "OpenSSL's reason for a TLS failure (executor.app.connect, executor.loop.planner_failures)"),
}


def test_the_library_enum_is_the_proto_enum() -> None:
    """Each RefusalReason is a proto RefusalReason and back (UNSPECIFIED aside): one list of names.

    DEFERRED alone is the library's: a stop the blast budget moved to a later tick, counted on the wire as
    ``actions_deferred``, never sent as a refusal.
    """
    proto = {name.removeprefix(PREFIX) for name in pb.RefusalReason.DESCRIPTOR.values_by_name} - {"UNSPECIFIED"}
    assert {reason.name for reason in RefusalReason} == proto | {"DEFERRED"}
    assert all(reason.value == reason.name for reason in RefusalReason)


def _caps_literals(path: Path) -> list[tuple[str, int]]:
    """The all-caps string literals of one module (one letter: a TypeVar's name) with their lines."""
    return [(node.value, node.lineno) for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 1
            and CAPS.match(node.value)]


def test_every_reason_spelt_in_the_executor_is_in_the_enum() -> None:
    """Every all-caps string in executor/ is a RefusalReason name or a known non-reason: a misspelt reason
    (which the API would send as UNSPECIFIED) fails here."""
    names = {reason.name for reason in RefusalReason} | set(NOT_REASONS)
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in sorted((ROOT / "executor").rglob("*.py"))
             if "_pb2" not in path.name for text, line in _caps_literals(path) if text not in names]
    assert found == []


def test_an_unknown_reason_is_not_silent() -> None:
    """A name the contract lacks (an old journal's) still maps to UNSPECIFIED on the wire, with a warning logged."""
    with capture_logs() as logs:
        assert reason_to_proto("DIGEST_STAEL") == pb.REFUSAL_REASON_UNSPECIFIED
        assert reason_to_proto(RefusalReason.DIGEST_STALE) == pb.REFUSAL_REASON_DIGEST_STALE
    assert [(e["event"], e["reason"], e["log_level"]) for e in logs] == [
        ("refusal_reason_unknown", "DIGEST_STAEL", "warning")]
