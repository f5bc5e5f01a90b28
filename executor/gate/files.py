"""The files the gate keeps in state_dir beside the journal: written atomically and private, and two marks.

Below the signed room because the gate itself writes them (the stop ledger; the intact mark it
unlinks when a journal write fails); the gate's clock and the trust keeper use them too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600, synced (a temporary of its own: writers may race)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


NONCES_MARK = "nonces.spent"  # in state_dir: this journal has accepted signed ops (it holds nonces)
INTACT_MARK = "journal.intact"  # in state_dir: no journal write has failed since start (unlinked when one does)
