"""The executor's error tree: one root, and what a caller may do about an error.

``ExecutorError`` is the root. Under it, three kinds say what to do (kopf's ``TemporaryError`` /
``PermanentError`` and temporalio's application errors are the models):

- ``TemporaryError``: try again later, the same call may succeed (Proxmox or the planner unreachable).
- ``PermanentError``: retrying gets the same answer (a refused request, an answer that does not parse).
- ``InvalidInputError``: what we were given is wrong (a declared state, a step's params); fix the input.

The existing errors keep their names and their old bases (``ValueError``, ``RuntimeError``), so every
catch site still catches them; the journal's errors stay in the standard-library-only ``journal``
leaf. A third-party error is wrapped once, where it is caught, with ``raise ... from exc``.
"""

from __future__ import annotations


class ExecutorError(Exception):
    """Any error the executor raises on purpose; a connection failure says why (``cause``) and what to do (``hint``).

    ``cause`` is a stable short code (``tls_untrusted``, ``refused``, ``dns``, ``timeout``, ``auth``,
    ``privilege``, ``planner_tls_required``...; the tables are ``executor.pve.failures`` and
    ``executor.loop.planner_failures``), None for an error that is not a connection failure.
    """

    cause: str | None = None
    hint: str = ""


def failure_fields(exc: BaseException) -> dict[str, str]:
    """The log fields of a failure's cause (``cause=``, ``hint=``): empty for an error without one."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, str):
        return {}
    hint = getattr(exc, "hint", "")
    return {"cause": cause, **({"hint": hint} if isinstance(hint, str) and hint else {})}


class TemporaryError(ExecutorError):
    """Retrying later may succeed: the next tick, or the client, tries again."""


class PermanentError(ExecutorError):
    """Retrying gets the same answer: report it, do not loop on it."""


class InvalidInputError(PermanentError):
    """The input is wrong (a file, a flag, a step's params); the message names it."""
