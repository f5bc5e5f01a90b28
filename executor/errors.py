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
    """Any error the executor raises on purpose."""


class TemporaryError(ExecutorError):
    """Retrying later may succeed: the next tick, or the client, tries again."""


class PermanentError(ExecutorError):
    """Retrying gets the same answer: report it, do not loop on it."""


class InvalidInputError(PermanentError):
    """The input is wrong (a file, a flag, a step's params); the message names it."""
