"""A child process for tests/test_hub_store.py: opens a store, says "ready", appends on "go", prints the outcome.

Usage: python -m tests.hub_store_child sqlite|postgres PATH_OR_CONNINFO CLUSTER EXPECTED RACE_WINDOW
Prints one JSON line: {"won": version} or {"conflict": [expected, current]}.
"""

from __future__ import annotations

import json
import os
import sys

from common.logs import configure
from hub.store import PostgresStore, SqliteStore, Store, VersionConflict


def main(argv: list[str]) -> int:
    """Open, wait for "go" on stdin, append once, report."""
    kind, where, cluster, expected, window = argv
    configure("json", sys.stderr)  # stdout carries the protocol
    store: Store = (SqliteStore(where, race_window=float(window)) if kind == "sqlite"
                    else PostgresStore(where, race_window=float(window)))
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        won = store.append(cluster, int(expected), f"from pid {os.getpid()}".encode(), "child", "race")
        print(json.dumps({"won": won.version}), flush=True)
    except VersionConflict as conflict:
        print(json.dumps({"conflict": [conflict.expected, conflict.current]}), flush=True)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
