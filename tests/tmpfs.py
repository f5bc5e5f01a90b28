"""A real, small tmpfs for the tests where a disk must really fill up."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_filesystem(tmp_path: Path, size: str = "256k", *, read_only: bool = False) -> Iterator[Path]:
    """A real, small tmpfs, so the disk really fills up (needs root to mount); ``read_only``: nothing writes
    there, root included (permissions do not stop root)."""
    mount = tmp_path / ("ro" if read_only else "tiny")
    mount.mkdir()
    options = f"ro,size={size}" if read_only else f"size={size}"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
