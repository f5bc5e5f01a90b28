"""Names that mean one thing: the names that once meant two things (issue #14) are each defined once.

``KINDS`` named three tables, ``Refused``, ``Pending``, ``classify`` and ``Proposal`` two things each;
they were renamed (``ACTION_KINDS``, ``KIND_RULES``, ``OP_KINDS``, ``RefusalRecord``,
``PendingApproval``, ``PendingSection``, ``classify_exit``, ``IssuedProposal``). Read from the source,
so a module that defines one of the old names again fails here before a reader confuses the two.
"""

from __future__ import annotations

import ast
import time
from collections import defaultdict
from pathlib import Path

from journal import Journal, RefusalRecord
from journal.records import fields_of

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("executor", "safety", "journal", "opctl")
ONCE_MEANT_TWO = ("KINDS", "Refused", "Pending", "classify", "Proposal")


def _defined(tree: ast.Module) -> set[str]:
    """The module-level names a module defines (classes, functions, assignments)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _definitions() -> dict[str, list[str]]:
    where: dict[str, list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for name in _defined(ast.parse(path.read_text(encoding="utf-8"))):
                where[name].append(str(path.relative_to(ROOT)))
    return where


def _aliases() -> list[str]:
    """``from x import Name as Other`` where Name is one of the old double names (the dodge they needed)."""
    found = []
    for package in (*PACKAGES, "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom):
                    found += [f"{path.relative_to(ROOT)}: {a.name} as {a.asname}" for a in node.names
                              if a.asname and a.name in ONCE_MEANT_TWO]
    return found


def test_each_name_that_once_meant_two_things_is_defined_at_most_once() -> None:
    """None of the old double names is defined in two modules of the daemon, the safety core or opctl."""
    where = _definitions()
    assert {name: where[name] for name in ONCE_MEANT_TWO if len(where[name]) > 1} == {}


def test_no_import_renames_one_of_them_on_the_way_in() -> None:
    """No ``import Pending as PendingSection``-style alias is left to tell two meanings apart."""
    assert _aliases() == []


def test_mark_ran_writes_the_record_refuse_always_wrote(tmp_path: Path) -> None:
    """``mark_ran`` keeps the on-disk record: the same bytes ``refuse(reason="NONCE_SPENT")`` writes.

    Journals written before ``mark_ran`` existed still open and read the same; ``last_refusal`` finds it.
    """
    at = time.time()
    with Journal.open(tmp_path / "new", clock=lambda: at) as journal:
        journal.mark_ran(vmid=100, kind="guest.destroy", op_id="op-1", key="act:100", detail="op op-1 ran it")
    with Journal.open(tmp_path / "old", clock=lambda: at) as journal:  # what the lane wrote before mark_ran
        journal.refuse(vmid=100, kind="guest.destroy", reason="NONCE_SPENT", op_id="op-1", key="act:100",
                       detail="op op-1 ran it")
    with Journal.open(tmp_path / "new") as new, Journal.open(tmp_path / "old") as old:
        [ran], [refused] = new.recent(), old.recent()
        assert isinstance(ran, RefusalRecord) and ran == refused
        assert fields_of(ran) == fields_of(refused)
        assert new.last_refusal("act:100") == ("NONCE_SPENT", "op op-1 ran it")
