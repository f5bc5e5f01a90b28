"""The desired file, parsed and checked: shared by the executor, opctl (``desired sign``) and the hub (``apply``).

Imports only safety, yaml and the standard library (an import-linter contract), so each of them may use it.
"""

from desiredfile.parse import GUEST_KEYS, STATES, Declared, DesiredFileError, check_types, parse

__all__ = ["GUEST_KEYS", "STATES", "Declared", "DesiredFileError", "check_types", "parse"]
