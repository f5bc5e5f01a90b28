"""Moved to ``desiredfile.configschema`` (the desired file's checks, shared with opctl and the hub); re-exported."""

from desiredfile.configschema import (
    DECLARED_ELSEWHERE,
    GUEST_TYPES,
    PARAMETER_WHY,
    TYPE_CHECKS,
    key_problem,
    property_problem,
    unknown_key,
    value_problem,
)

__all__ = ["DECLARED_ELSEWHERE", "GUEST_TYPES", "PARAMETER_WHY", "TYPE_CHECKS", "key_problem", "property_problem",
           "unknown_key", "value_problem"]
