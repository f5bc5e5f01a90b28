"""The installed version (``--version`` of every command) and the exit codes each ``--help`` lists."""

from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from pathlib import Path

DISTRIBUTION = "pve-reconcile"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
EXIT_CODES = ("exit codes: 0 ok; 1 the thing failed or was refused (Proxmox error, op refused, tick failed, "
              "port in use); 2 usage or configuration error (bad flag, bad file)")


def version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version``: prints ``<prog> <version>`` and exits 0."""
    parser.add_argument("--version", action="version", version=f"{prog} {version()}", help="print the version and exit")
