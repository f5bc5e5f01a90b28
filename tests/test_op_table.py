"""docs/op-kinds.md is generated from the code (issue 15): the table of op kinds cannot drift from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_op_table  # noqa: E402

from safety import opschema  # noqa: E402
from safety.classify import KIND_RULES  # noqa: E402


def test_the_op_table_is_fresh() -> None:
    """docs/op-kinds.md is what scripts/gen_op_table.py makes of the code now (run it to refresh)."""
    result = subprocess.run([sys.executable, "scripts/gen_op_table.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_every_signable_kind_has_a_row_with_its_class() -> None:
    """Each kind an operator can sign is in the table, with the class the classifier gives it."""
    text = (ROOT / "docs" / "op-kinds.md").read_text(encoding="utf-8")
    for kind in sorted(opschema.OP_KINDS):
        assert f"| `{kind}` | {KIND_RULES[kind].cls.name} |" in text, kind


def test_a_parameter_is_described_by_its_own_validator() -> None:
    """The words come from the validator: a disk resize's size says its range, a destroy's flags are required."""
    assert "`size` (required): an integer in 1..9007199254740992" in gen_op_table.params("disk.resize")
    assert "`purge` (required): true or false" in gen_op_table.params("guest.destroy")
    assert gen_op_table.params("start") == "none"
