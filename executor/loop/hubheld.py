"""The hub document a node holds, on disk: the last verified envelope and its ``Held`` line, in state_dir.

Files written atomically (temporary, fsync, rename, fsync of the directory): the envelope of the new version
(``hub-document.VERSION``) first, then the held line (``hub-held``, ``VERSION SHA256``), which is the commit
point, then the envelopes of older versions are removed. A crash before the line leaves the old line and the
old envelope in force (the hub sends the new version again); after it, the new ones. With no line at all, the
highest document file is the floor (a first save cut short, or a line deleted: never a silent version 0).
Nothing here verifies a signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from executor.gate.files import write_private
from safety import desireddoc
from safety.desireddoc import Held
from safety.refusal import Refused

DOCUMENT_PREFIX = "hub-document."
HELD_FILE = "hub-held"
PASSED_FILE = "hub-resets-passed"  # floor resets this node took a later version under: never applied again


def reset_line(cluster: str, version: int, sha256: str) -> str:
    """A floor reset as ``hub-resets-passed`` records it."""
    return f"{cluster} {version} {sha256}"


class HeldFileError(Exception):
    """The held files exist but cannot be read or do not agree: the hub source refuses to start (no silent 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OnDisk:
    """What the state directory holds: the floor (``held``) and the envelope bytes of that version (b"": none)."""

    held: Held
    envelope: bytes


@dataclass(frozen=True, slots=True)
class HeldFiles:
    """The two files in ``state_dir``."""

    state_dir: Path

    @property
    def held_path(self) -> Path:
        """The ``VERSION SHA256`` line."""
        return self.state_dir / HELD_FILE

    def document_path(self, version: int) -> Path:
        """The envelope bytes of ``version``, as the hub sent them."""
        return self.state_dir / f"{DOCUMENT_PREFIX}{version}"

    def load(self) -> OnDisk:
        """The held version and its envelope; ``Held()`` when none was ever taken; HeldFileError when unreadable."""
        try:
            text = self.held_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return self._orphan()
        except (OSError, UnicodeDecodeError) as exc:
            raise HeldFileError(f"{self.held_path}: cannot read: {exc}") from exc
        try:
            held = Held.from_text(text)
        except ValueError as exc:
            raise HeldFileError(f"{self.held_path}: {exc}") from exc
        return OnDisk(held=held, envelope=self._envelope(held))

    def _orphan(self) -> OnDisk:
        """Without the held line, the highest version a document file holds (under its own name) is the floor.

        Either a first save killed before its line (that document was verified before it was written, and is
        verified again at start) or a line deleted since: starting at 0 would let a hub roll the node back.
        """
        found = OnDisk(held=Held(), envelope=b"")
        for path in self.state_dir.glob(f"{DOCUMENT_PREFIX}*"):
            try:
                data = path.read_bytes()
                envelope = desireddoc.parse_envelope(data)
                version = desireddoc.parse_payload(envelope.payload).version
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise HeldFileError(f"{path}: cannot read: {exc.strerror}") from exc
            except Refused:
                continue  # not a document: it cannot be served, and nothing signed says its version
            if path.name == self.document_path(version).name and version > found.held.version:
                found = OnDisk(held=Held(version=version, sha256=desireddoc.payload_sha256(envelope)), envelope=data)
        return found

    def _envelope(self, held: Held) -> bytes:
        """The envelope of ``held``, or b"" (the floor kept, no document) when it is missing or another version's."""
        path = self.document_path(held.version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise HeldFileError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            sha256 = desireddoc.payload_sha256(desireddoc.parse_envelope(data))
        except Refused:
            return b""
        return data if sha256 == held.sha256 else b""

    @property
    def passed_path(self) -> Path:
        """The floor resets passed, one ``CLUSTER VERSION SHA256`` line each."""
        return self.state_dir / PASSED_FILE

    def passed(self) -> frozenset[str]:
        """The floor resets passed (``reset_line``): a version above each was taken here under the store naming it."""
        try:
            text = self.passed_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return frozenset()
        except (OSError, UnicodeDecodeError) as exc:
            raise HeldFileError(f"{self.passed_path}: cannot read: {exc}") from exc
        return frozenset(line for line in text.splitlines() if line)

    def mark_passed(self, line: str) -> None:
        """Record a floor reset passed (``reset_line``), atomically and synced, before the version above it is saved.

        A reset answers one incident: left in the trust store, it must not lower the floor again when a later
        revocation voids a version this node took after it (a broken hub would then replay the versions between).
        """
        lines = self.passed() | {line}
        write_private(self.passed_path, "".join(f"{item}\n" for item in sorted(lines)).encode("ascii"))

    def reset(self, held: Held) -> None:
        """A floor reset by the trust store: the held line alone (the commit point), then the old envelopes removed.

        The line names a version whose document is not here: the node holds the floor, manages nothing, and takes
        that document (or a later one) from the hub, as after a restart with the envelope missing.
        """
        write_private(self.held_path, held.to_text().encode("ascii"))
        for old in self.state_dir.glob(f"{DOCUMENT_PREFIX}*"):
            old.unlink(missing_ok=True)

    def save(self, envelope: bytes, held: Held) -> None:
        """The envelope, then the held line (the commit point), each atomically and synced."""
        if hashlib.sha256(desireddoc.parse_envelope(envelope).payload).hexdigest() != held.sha256:
            raise ValueError("the envelope is not the held version's")
        write_private(self.document_path(held.version), envelope)
        write_private(self.held_path, held.to_text().encode("ascii"))
        for old in self.state_dir.glob(f"{DOCUMENT_PREFIX}*"):
            if old.name != self.document_path(held.version).name:
                old.unlink(missing_ok=True)
