"""The hub's storage: per cluster, a gap-free sequence of signed desired-state documents and each node's ACK/NACK.

``Store`` is the seam; ``SqliteStore`` (embedded, the default) and ``PostgresStore`` (several hub
replicas on one database) implement it and pass the same tests (tests/test_hub_store.py).
"""

from hub.store.model import (
    DEFAULT_MAX_ENVELOPE,
    Delivery,
    DocumentTooLarge,
    Entry,
    GuestRow,
    InvalidArgumentError,
    NodeReport,
    NodeState,
    OpRow,
    Recorded,
    SchemaTooNewError,
    StateIn,
    StoreError,
    StoreUnavailableError,
    UnknownVersionError,
    Version,
    VersionConflict,
)
from hub.store.postgres import PostgresStore
from hub.store.protocol import Store
from hub.store.sqlite import SqliteStore

__all__ = [
    "DEFAULT_MAX_ENVELOPE",
    "Delivery",
    "DocumentTooLarge",
    "Entry",
    "GuestRow",
    "InvalidArgumentError",
    "NodeReport",
    "NodeState",
    "OpRow",
    "PostgresStore",
    "Recorded",
    "SchemaTooNewError",
    "SqliteStore",
    "StateIn",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "UnknownVersionError",
    "Version",
    "VersionConflict",
]
