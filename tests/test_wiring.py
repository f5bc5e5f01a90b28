"""One builder: only ``executor.app.wiring`` constructs the executor's parts, and nothing patches them afterwards.

Read from the source (ast), so a second place that wires a Gate, an Engine or an OpDesk by hand, or a
helper that assigns a collaborator onto a built object, fails here before it drifts from the daemon's wiring.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILT = frozenset({"Gate", "Lane", "Engine", "OpDesk", "ReadAhead", "GateClock", "ProxmoxWriter", "Funnel",
                   "OpVerifier"})
# The collaborators handed in at construction (before: assigned from outside).
HANDED_IN = frozenset({"reverify", "wall", "settings", "ahead", "provider", "planner", "journal", "holders",
                       "before_tick"})
# What builds: the executor and the operator's tool, the benchmarks, and the tests' shared helpers.
SOURCES = [*sorted((ROOT / "executor").rglob("*.py")), *sorted((ROOT / "opctl").rglob("*.py")),
           *sorted((ROOT / "bench").glob("*.py")), ROOT / "tests" / "conftest.py",
           *sorted((ROOT / "tests").glob("*_helpers.py"))]
WIRING = ROOT / "executor" / "app" / "wiring.py"
# A part that builds its own piece: the gate its lane.
OWN_PIECES = {(ROOT / "executor" / "gate" / "gate.py", "Lane")}


def _calls(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BUILT:
            names.append(node.func.id)
    return names


def test_only_the_wiring_builds_the_parts() -> None:
    """Gate, Engine, OpDesk, the read-ahead, the gate's clock and the Proxmox writer are built in wiring alone."""
    elsewhere = {f"{path.relative_to(ROOT)}: {name}" for path in SOURCES if path != WIRING
                 for name in _calls(path) if (path, name) not in OWN_PIECES}
    assert elsewhere == set()


def test_nothing_is_assigned_onto_a_built_part() -> None:
    """No ``x.gate.wall = ...``, ``engine.provider = ...``, ``gate.lane.ahead = ...``: collaborators are arguments."""
    found = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                if (isinstance(target, ast.Attribute) and target.attr in HANDED_IN
                        and not (isinstance(target.value, ast.Name) and target.value.id == "self")):
                    found.add(f"{path.relative_to(ROOT)}:{node.lineno}: .{target.attr} =")
    assert found == set()


def test_the_wiring_hands_no_closure_over_a_later_part() -> None:
    """``assemble`` builds in a straight line: no nested function or lambda standing in for a part built after it."""
    tree = ast.parse(WIRING.read_text(encoding="utf-8"))
    assemble = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "assemble")
    closures = [f"{type(n).__name__}:{n.lineno}" for n in ast.walk(assemble) if n is not assemble
                and isinstance(n, ast.FunctionDef | ast.Lambda)]
    assert closures == []
