"""The contract: generated code is fresh and the domain enums mirror the proto enums."""

from __future__ import annotations

import enum
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from planner.model import GuestType, RunState, SkipReason
from planner.v1 import planner_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos() -> None:
    """Editing a .proto without regenerating fails the suite."""
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("domain", "wire", "prefix"), [
    (RunState, pb.RunState, "RUN_STATE_"), (GuestType, pb.GuestType, "GUEST_TYPE_"),
    (SkipReason, pb.SkipReason, "SKIP_REASON_"),
])
def test_domain_enums_mirror_the_contract(domain: type[enum.IntEnum], wire: EnumTypeWrapper, prefix: str) -> None:
    """Every proto enum value has a domain twin with the same number, and no more."""
    assert {prefix + m.name: m.value for m in domain} == dict(wire.items())
