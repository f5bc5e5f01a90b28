"""Child process for the crash tests: appends in a loop, reporting each acknowledged step.

Usage: python -m tests.journal_child DIR PREFIX. Prints ``B op key`` once ``begin`` returned and
``E op`` once ``end`` returned, flushed, so the parent knows exactly what was acknowledged.
"""

from __future__ import annotations

import sys

from journal import Journal, Outcome


def main() -> None:
    """Append until killed."""
    directory, prefix = sys.argv[1], sys.argv[2]
    journal = Journal.open(directory, segment_bytes=8192)
    print("READY", flush=True)
    i = 0
    while True:
        key = f"{prefix}-{i}"
        op = journal.begin(vmid=100 + i % 50, kind="snapshot", payload={"name": key, "pad": "x" * (i % 97)}, key=key)
        print(f"B {op} {key}", flush=True)
        if i % 3:
            journal.task(op, f"UPID:pve:{i:08X}:00000000:00000000:qmsnapshot:{100 + i % 50}:root@pam:")
        journal.end(op, Outcome.OK)
        print(f"E {op}", flush=True)
        i += 1


if __name__ == "__main__":
    main()
