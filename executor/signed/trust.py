"""The node's trust store as the executor keeps it: loaded, reloaded when it changes, never rolled back.

A bad file at start means no signers; a bad reload keeps the last good store (both loudly). The last
store accepted (version and sha256) is kept in state_dir/trust.version, so a restart refuses an
older version, or the same version with other content, as a running daemon does.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog

from common.config import ConfigError
from executor.gate.files import write_private
from safety.truststore import FLOOR_FILE, TrustStore, TrustStoreHolder, read_floor

log = structlog.get_logger("executor.optrust")


class TrustKeeper:
    """The trust store holder of one executor (none when ``trust_store`` is unset)."""

    def __init__(self, path: str | None, state_dir: str) -> None:
        self._version_file = Path(state_dir) / FLOOR_FILE
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()  # a SIGHUP's reload (its own thread) and a tick's may coincide
        self.holder: TrustStoreHolder | None = None
        if path:
            version, sha256 = self._floor()
            self.holder = TrustStoreHolder(path, min_version=version, min_sha256=sha256)
            try:
                self.reload()
            except OSError as exc:  # the floor cannot be kept: a restart could then load a rolled-back store
                raise ConfigError("state_dir", f"{state_dir}: cannot write {FLOOR_FILE} ({exc.strerror}): the "
                                               "trust store's last accepted version is kept there; give a "
                                               "writable --state-dir") from exc

    def _floor(self) -> tuple[int, str | None]:
        """The last trust store accepted here: (version, sha256) (``trust check --state-dir`` reads it alike)."""
        return read_floor(self._version_file.parent)

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.holder is not None
        try:
            st = os.stat(self.holder.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        """Load the file again; remember what was accepted."""
        if self.holder is None:
            return
        with self._lock:
            self._reload()

    def _reload(self) -> None:
        assert self.holder is not None
        self._stamp = self._file_stamp()
        error = self.holder.reload()
        if error is not None:
            log.error("trust_store_invalid", path=str(self.holder.path), error=str(error),
                      consequence="no signers" if self.holder.current is None else "the last good store stays")
            return
        current = self.holder.current
        assert current is not None
        write_private(self._version_file, f"{current.version} {current.sha256}\n".encode())
        log.info("trust_store_loaded", version=current.version, keys=len(current.keys), roles=len(current.roles))

    def reload_if_changed(self) -> None:
        """Reload when the file's mtime or size moved since the last load."""
        if self.holder is not None and self._file_stamp() != self._stamp:
            self.reload()

    def current(self) -> TrustStore | None:
        """The store in force."""
        return self.holder.current if self.holder is not None else None

    def state(self) -> tuple[bool, int, int, str]:
        """(signed ops on, trust version, keys, why off)."""
        if self.holder is None:
            return False, 0, 0, "no trust store configured (trust_store): every non-benign step is refused"
        current = self.holder.current
        if current is None:
            return False, 0, 0, f"trust store invalid: {self.holder.error}"
        return True, current.version, len(current.keys), ""
