"""The executor's error tree: one root, three kinds, the old names and bases kept for their catch sites."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from executor.errors import ExecutorError, InvalidInputError, PermanentError, TemporaryError
from executor.gate.kinds import StepError
from executor.loop.desired import DesiredStateError
from executor.loop.planner_client import PlannerError, PlannerRefusedError, PlannerUnavailableError
from executor.loop.queue import QueueClosedError
from executor.loop.recovery import RecoveryInterruptedError
from executor.pve.node import PveAnswerError, PveError, PveNotSentError, PveUnavailableError
from executor.pve.parse import MalformedAnswerError
from executor.signed.desk import RateLimitedError

ROOT = Path(__file__).resolve().parent.parent

# Each error, the kind it is (what a caller may do about it), and the old base its catch sites rely on.
TREE: list[tuple[type[Exception], type[ExecutorError], type[Exception]]] = [
    (PveError, ExecutorError, Exception),
    (PveUnavailableError, TemporaryError, PveError),
    (PveNotSentError, TemporaryError, PveUnavailableError),
    (PveAnswerError, PermanentError, PveError),
    (StepError, InvalidInputError, PveError),
    (MalformedAnswerError, PermanentError, ValueError),
    (PlannerError, ExecutorError, RuntimeError),
    (PlannerUnavailableError, TemporaryError, PlannerError),
    (PlannerRefusedError, PermanentError, PlannerError),
    (DesiredStateError, InvalidInputError, ValueError),
    (RateLimitedError, TemporaryError, RuntimeError),
    (RecoveryInterruptedError, TemporaryError, RuntimeError),
    (QueueClosedError, PermanentError, RuntimeError),
]


@pytest.mark.parametrize(("error", "kind", "old_base"), TREE, ids=[e.__name__ for e, _, _ in TREE])
def test_every_executor_error_has_one_root_a_kind_and_its_old_base(error: type[Exception], kind: type[ExecutorError],
                                                                   old_base: type[Exception]) -> None:
    """Each error is an ExecutorError of its kind, and still what its existing ``except`` clauses catch."""
    assert issubclass(error, ExecutorError)
    assert issubclass(error, kind)
    assert issubclass(error, old_base)


def test_the_three_kinds_are_apart() -> None:
    """Temporary is never permanent; invalid input is a permanent error (retrying the same input fails the same)."""
    assert not issubclass(TemporaryError, PermanentError) and not issubclass(PermanentError, TemporaryError)
    assert issubclass(InvalidInputError, PermanentError)


def test_the_status_of_a_pve_error_survives() -> None:
    """PveError keeps its HTTP status under the new root."""
    assert PveUnavailableError("no answer", 503).status == 503
    assert StepError("bad param").status == 400


def _raises_from_none(path: Path) -> list[str]:
    """``raise ... from None`` in one module: file:line for each."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None]


@pytest.mark.parametrize("package", ["executor", "opctl", "common"])
def test_no_cause_is_dropped(package: str) -> None:
    """Errors are wrapped with their cause chained (``from exc``), never ``from None``: a traceback shows what failed.

    (A user-facing message stays one clean line; the chain is for the log and the developer.)
    """
    found = [hit for path in sorted((ROOT / package).rglob("*.py")) if "_pb2" not in path.name
             for hit in _raises_from_none(path)]
    assert found == []
