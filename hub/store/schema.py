"""The store's schema as numbered migrations, one table per database (SQLite, PostgreSQL), side by side.

A database records each step it ran in ``schema_version``; opening it runs the steps it lacks, in
one transaction, and refuses a database that ran steps this code does not know (``SchemaTooNewError``).
Append steps; never edit one that shipped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: its number (1, 2, ... in order), what it does, and its statements."""

    number: int
    description: str
    statements: tuple[str, ...]


SQLITE_SCHEMA_VERSION = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"""

SQLITE: tuple[Migration, ...] = (
    Migration(1, "documents and node acknowledgements", (
        """CREATE TABLE documents (
            cluster TEXT NOT NULL, version INTEGER NOT NULL CHECK (version >= 1), envelope BLOB NOT NULL,
            sha256 TEXT NOT NULL, author TEXT NOT NULL, message TEXT NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY (cluster, version))""",
        """CREATE TABLE acks (
            cluster TEXT NOT NULL, node TEXT NOT NULL, version INTEGER NOT NULL, ok INTEGER NOT NULL,
            reason TEXT NOT NULL, last_seen REAL NOT NULL, PRIMARY KEY (cluster, node))""",
    )),
    Migration(2, "heads (each cluster's latest version); the version each node holds", (
        "CREATE TABLE heads (cluster TEXT PRIMARY KEY, latest INTEGER NOT NULL CHECK (latest >= 0))",
        "INSERT INTO heads (cluster, latest) SELECT cluster, MAX(version) FROM documents GROUP BY cluster",
        "ALTER TABLE acks ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
        # Before step 2 a NACK did not keep the version held; an ACK's version is the best known.
        "UPDATE acks SET held = version WHERE ok = 1",
    )),
    Migration(3, "the fleet view: each node's last state report, its guests and its recent signed ops", (
        """CREATE TABLE node_states (
            cluster TEXT NOT NULL, node TEXT NOT NULL, audience TEXT NOT NULL, session TEXT NOT NULL,
            seq INTEGER NOT NULL, received REAL NOT NULL, at_ms INTEGER NOT NULL, interval_s REAL NOT NULL,
            held_version INTEGER NOT NULL, tick_outcome TEXT NOT NULL, tick_error TEXT NOT NULL,
            PRIMARY KEY (cluster, node))""",
        """CREATE TABLE node_guests (
            cluster TEXT NOT NULL, node TEXT NOT NULL, vmid INTEGER NOT NULL, state TEXT NOT NULL,
            pending INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY (cluster, node, vmid))""",
        """CREATE TABLE node_ops (
            cluster TEXT NOT NULL, node TEXT NOT NULL, op_id TEXT NOT NULL, payload_sha256 TEXT NOT NULL,
            fate TEXT NOT NULL, at_ms INTEGER NOT NULL, body BLOB NOT NULL,
            PRIMARY KEY (cluster, node, op_id, payload_sha256))""",
    )),
    Migration(4, "deliveries: signed ops routed through the hub to the node their audience names", (
        """CREATE TABLE deliveries (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, delivery_id TEXT NOT NULL UNIQUE, cluster TEXT NOT NULL,
            node TEXT NOT NULL, envelope BLOB NOT NULL, op_id TEXT NOT NULL, kind TEXT NOT NULL,
            state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
            submitted_at REAL NOT NULL, decided_at REAL, op_report BLOB NOT NULL DEFAULT x'')""",
        "CREATE INDEX deliveries_open ON deliveries (cluster, node, state)",
        "CREATE INDEX deliveries_op ON deliveries (cluster, op_id)",
        "CREATE INDEX deliveries_seq ON deliveries (cluster, seq)",  # a feed's MAX(seq) and "past seq" reads
        """CREATE TABLE audiences (
            cluster TEXT NOT NULL, node TEXT NOT NULL, audience TEXT NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (cluster, node))""",
        "CREATE INDEX audiences_by_audience ON audiences (cluster, audience)",
    )),
)

POSTGRES_SCHEMA_VERSION = """CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY, description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""

# Taken for the whole migration transaction, so replicas starting together migrate one at a time.
POSTGRES_MIGRATION_LOCK = 0x6875625F73746F72  # "hub_stor"

POSTGRES: tuple[Migration, ...] = (
    Migration(1, "documents and node acknowledgements", (
        """CREATE TABLE documents (
            cluster text NOT NULL, version bigint NOT NULL CHECK (version >= 1), envelope bytea NOT NULL,
            sha256 text NOT NULL, author text NOT NULL, message text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (cluster, version))""",
        """CREATE TABLE acks (
            cluster text NOT NULL, node text NOT NULL, version bigint NOT NULL, ok boolean NOT NULL,
            reason text NOT NULL, last_seen timestamptz NOT NULL, PRIMARY KEY (cluster, node))""",
    )),
    Migration(2, "heads (each cluster's latest version, the row an append locks); the version each node holds", (
        "CREATE TABLE heads (cluster text PRIMARY KEY, latest bigint NOT NULL CHECK (latest >= 0))",
        "INSERT INTO heads (cluster, latest) SELECT cluster, MAX(version) FROM documents GROUP BY cluster",
        "ALTER TABLE acks ADD COLUMN held bigint NOT NULL DEFAULT 0",
        "UPDATE acks SET held = version WHERE ok",
    )),
    Migration(3, "the fleet view: each node's last state report, its guests and its recent signed ops", (
        """CREATE TABLE node_states (
            cluster text NOT NULL, node text NOT NULL, audience text NOT NULL, session text NOT NULL,
            seq bigint NOT NULL, received timestamptz NOT NULL DEFAULT now(), at_ms bigint NOT NULL,
            interval_s double precision NOT NULL, held_version bigint NOT NULL, tick_outcome text NOT NULL,
            tick_error text NOT NULL, PRIMARY KEY (cluster, node))""",
        """CREATE TABLE node_guests (
            cluster text NOT NULL, node text NOT NULL, vmid bigint NOT NULL, state text NOT NULL,
            pending integer NOT NULL, body bytea NOT NULL, PRIMARY KEY (cluster, node, vmid))""",
        """CREATE TABLE node_ops (
            cluster text NOT NULL, node text NOT NULL, op_id text NOT NULL, payload_sha256 text NOT NULL,
            fate text NOT NULL, at_ms bigint NOT NULL, body bytea NOT NULL,
            PRIMARY KEY (cluster, node, op_id, payload_sha256))""",
    )),
    Migration(4, "deliveries: signed ops routed through the hub to the node their audience names", (
        """CREATE TABLE deliveries (
            seq bigserial PRIMARY KEY, delivery_id text NOT NULL UNIQUE, cluster text NOT NULL, node text NOT NULL,
            envelope bytea NOT NULL, op_id text NOT NULL, kind text NOT NULL, state text NOT NULL,
            reason text NOT NULL DEFAULT '', detail text NOT NULL DEFAULT '',
            submitted_at timestamptz NOT NULL DEFAULT now(), decided_at timestamptz,
            op_report bytea NOT NULL DEFAULT '')""",
        "CREATE INDEX deliveries_open ON deliveries (cluster, node, state)",
        "CREATE INDEX deliveries_op ON deliveries (cluster, op_id)",
        "CREATE INDEX deliveries_seq ON deliveries (cluster, seq)",  # a feed's MAX(seq) and "past seq" reads
        """CREATE TABLE audiences (
            cluster text NOT NULL, node text NOT NULL, audience text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (cluster, node))""",
        "CREATE INDEX audiences_by_audience ON audiences (cluster, audience)",
    )),
)

LATEST = len(SQLITE)
assert len(POSTGRES) == LATEST, "both databases run the same steps"
assert all(m.number == i for i, m in enumerate(SQLITE, 1)) and all(m.number == i for i, m in enumerate(POSTGRES, 1))
