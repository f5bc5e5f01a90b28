"""The scope check, before classification: an action may touch only what the desired state declared.

A start or stop only where a run state is declared, and in its direction; a config write only of
declared keys (and ``description`` when it is declared); an undeclared guest, or any other kind,
is out of scope of desired state, whatever its class.
"""

from __future__ import annotations

from dataclasses import dataclass

from safety.model import Action

_POWER = {"start": "running", "stop": "stopped"}
_CONFIG_KINDS = frozenset({"set_config"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Declaration:
    """What the desired state declares for one guest."""

    vmid: int
    state: str | None  # "running" | "stopped" | None: power not managed
    config_keys: frozenset[str] | None  # None: config not managed
    description: bool  # description managed


def out_of_scope(action: Action, declared: Declaration | None) -> str | None:
    """None when ``action`` stays inside what ``declared`` manages; otherwise why it does not."""
    what = f"{action.kind} for guest {action.vmid}"
    if declared is None:
        return f"{what}: the guest is not declared in the desired state"
    if declared.vmid != action.vmid:
        return f"{what}: checked against the declaration of guest {declared.vmid}"
    wanted = _POWER.get(action.kind)
    if wanted is not None:
        return _power(what, wanted, declared)
    if action.kind in _CONFIG_KINDS:
        return _config(what, action, declared)
    return f"{what}: desired state never declares a {action.kind!r} action"


def _power(what: str, wanted: str, declared: Declaration) -> str | None:
    if declared.state is None:
        return f"{what}: the guest's run state is not managed"
    if declared.state != wanted:
        return f"{what}: the declared run state is {declared.state}"
    return None


def _config(what: str, action: Action, declared: Declaration) -> str | None:
    allowed = set(declared.config_keys or ())
    if declared.description:
        allowed.add("description")
    if declared.config_keys is None and not declared.description:
        return f"{what}: neither config nor description is managed"
    touched = set(action.set) | set(action.delete)
    extra = sorted(touched - allowed)
    if extra:
        return f"{what}: keys not declared: {', '.join(extra)}"
    return None
