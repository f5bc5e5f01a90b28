"""The operator's offline commands as an operator runs them: ``python -m executor`` in a subprocess.

keys generate -> a real trust store file -> trust check; op sign / cosign / verify on proposals built
with the gate's own ``action_of`` and ``challenge.issue``; the typed-vmid confirmation fed on stdin.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from safety import challenge, signedop
from safety.payload import action_of, parse_payload
from safety.truststore import key_id
from tests.signing import AUDIENCE, DIGEST, SECRET, default_roles, to_toml, write_store

ROOT = Path(__file__).resolve().parent.parent
DESTROY = {"purge": True, "destroy_unreferenced_disks": False}


def cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m executor ARGS`` in its own session (no controlling terminal), stdin fed or empty."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "executor", *args], cwd=cwd, env=env, input=stdin or "",
                          capture_output=True, text=True, timeout=60, check=False, start_new_session=True)


def proposal(kind: str = "guest.destroy", params: dict[str, Any] | None = None, cls: str = "DESTRUCTIVE",
             *, vmid: int = 105, issued: float | None = None) -> dict[str, Any]:
    """A proposal as op propose prints it, with a challenge from pve1's gate secret."""
    action = action_of(audience=AUDIENCE, vmid=vmid, guest_type="qemu", kind=kind,
                       params=DESTROY if params is None else params, class_=cls, digest=DIGEST, run_state="stopped")
    return {"action": action, "challenge": challenge.issue(SECRET, action, now=issued or time.time()),
            "class": cls, "rule": f"kind:{kind}", "reasons": ["test"], "before": {"scsi0": "local-lvm:vm-105-disk-0"}}


_GROW = proposal("disk.resize", {"disk": "scsi0", "size": 1 << 30}, "APPROVAL")
GROW_TO_ZERO = {**_GROW, "action": {**_GROW["action"], "params": {"disk": "scsi0", "size": 0}}}


def entry(toml: str, roles: list[str]) -> str:
    """A printed [[keys]] entry with roles granted, as the store's owner pastes it."""
    return re.sub(r"^roles = \[\].*$", f"roles = {json.dumps(roles)}", toml, flags=re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Desk:
    """A working directory with alice's and bob's generated keys, a trust store and a destroy proposal."""

    path: Path
    trust: Path
    entries: dict[str, str]  # the [[keys]] entries keys generate printed, by name

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The CLI in this directory."""
        return cli(*args, cwd=self.path, stdin=stdin)

    def write(self, name: str, doc: object) -> str:
        """A JSON document written here."""
        (self.path / name).write_text(json.dumps(doc), encoding="utf-8")
        return name

    def envelope(self, name: str) -> signedop.Envelope:
        """An envelope file written here, parsed strictly."""
        return signedop.parse_envelope_json((self.path / name).read_bytes())


@pytest.fixture(name="desk", scope="module")
def _desk(tmp_path_factory: pytest.TempPathFactory) -> Desk:
    path = tmp_path_factory.mktemp("desk")
    entries = {}
    for name in ("alice", "bob"):
        done = cli("keys", "generate", "--out", f"{name}.key", "--owner", f"{name}@example.org",
                   "--not-after", "2030-01-01", cwd=path)
        assert done.returncode == 0, done.stderr
        entries[name] = done.stdout
    store = "\n".join([to_toml({"version": 7, "roles": default_roles()}),
                       entry(entries["alice"], ["destroyer", "operator"]), entry(entries["bob"], ["destroyer"])])
    trust = write_store(path, store)
    return Desk(path=path, trust=trust, entries=entries)


@pytest.fixture(name="signed", scope="module")
def _signed(desk: Desk) -> Path:
    """d.op: the destroy proposal signed by alice (typing 105) and co-signed by bob (typing 105)."""
    desk.write("d.json", proposal())
    done = desk.run("op", "sign", "--key", "alice.key", "--role", "destroyer", "--reason", "OPS-123 retire",
                    "--out", "d1.op", "d.json", stdin="105\n")
    assert done.returncode == 0, done.stderr
    (desk.path / "d.op").write_bytes((desk.path / "d1.op").read_bytes())
    done = desk.run("op", "cosign", "--key", "bob.key", "d.op", stdin="105\n")
    assert done.returncode == 0, done.stderr
    return desk.path / "d.op"


def test_generated_key_is_private_and_its_entry_loads(desk: Desk) -> None:
    """keys generate writes a 0600 PKCS8 Ed25519 key whose printed [[keys]] entry the trust store accepts."""
    key_file = desk.path / "alice.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = load_pem_private_key(key_file.read_bytes(), password=None)
    raw = signedop.public_raw(key.public_key())  # type: ignore[arg-type]
    assert f'id = "{key_id(raw)}"' in desk.entries["alice"]
    assert f'public = "ed25519:{base64.b64encode(raw).decode()}"' in desk.entries["alice"]
    done = desk.run("trust", "check", str(desk.trust))
    assert done.returncode == 0, done.stderr
    assert "version 7" in done.stdout
    assert f"key {key_id(raw)} (alice@example.org): valid until 2030-01-01 00:00 UTC; roles destroyer, operator" \
        in done.stdout
    assert "role destroyer: may sign config.disk_detach" in done.stdout


def test_generate_never_overwrites_a_key(desk: Desk) -> None:
    """A second keys generate on the same file fails and leaves the first key untouched."""
    before = (desk.path / "alice.key").read_bytes()
    done = desk.run("keys", "generate", "--out", "alice.key")
    assert done.returncode == 2
    assert "never overwritten" in done.stderr
    assert (desk.path / "alice.key").read_bytes() == before


def test_passphrase_protects_the_key(tmp_path: Path) -> None:
    """A key generated with a passphrase file is encrypted; signing needs the passphrase (no terminal: refused)."""
    (tmp_path / "pass").write_text("correct horse\n", encoding="utf-8")
    assert cli("keys", "generate", "--out", "k.key", "--passphrase-file", "pass", cwd=tmp_path).returncode == 0
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.key").read_bytes()
    (tmp_path / "d.json").write_text(json.dumps(proposal()), encoding="utf-8")
    sign = ("op", "sign", "--key", "k.key", "--role", "destroyer", "--yes", "d.json")
    refused = cli(*sign, cwd=tmp_path)
    assert refused.returncode == 2
    assert "encrypted; give --passphrase-file" in refused.stderr
    done = cli(*sign[:-1], "--passphrase-file", "pass", "d.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["payloadType"] == signedop.PAYLOAD_TYPE


@pytest.mark.parametrize(("mode", "store", "message"), [
    (0o664, None, "must not be writable by group or others (mode 0664)"),
    (0o644, "version = 1\n[[keys]]\nid = \"sha256:" + "0" * 64 + "\"\npublic = \"ed25519:"
     + base64.b64encode(bytes(range(1, 33))).decode() + "\"\nowner = \"x\"\nnot_after = 2030-01-01T00:00:00Z\n",
     "keys[0].id: must equal sha256 of the public key"),
])
def test_trust_check_names_the_fault(desk: Desk, tmp_path: Path, mode: int, store: str | None, message: str) -> None:
    """trust check refuses a store the executor would refuse, exits 2, and names the field."""
    path = write_store(tmp_path, store or desk.trust.read_text(encoding="utf-8"), mode=mode)
    done = cli("trust", "check", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert "INVALID" in done.stderr and message in done.stderr


def test_sign_builds_the_payload_from_the_proposal(desk: Desk, signed: Path) -> None:
    """The signed payload names the proposal's action and challenge, backdated 60 s, valid ttl, as the role."""
    document = json.loads((desk.path / "d.json").read_text(encoding="utf-8"))
    envelope = desk.envelope("d1.op")
    payload = parse_payload(envelope.payload)
    assert json.loads(envelope.payload) == {**document["action"], "v": 1, "op_id": payload.op_id,
                                            "challenge": document["challenge"], "role": "destroyer",
                                            "not_before": payload.not_before, "not_after": payload.not_after,
                                            "reason": "OPS-123 retire"}
    assert re.fullmatch(r"[0-9a-f]{32}", payload.op_id)
    assert abs(payload.not_before - (time.time() - 60)) < 30
    assert payload.not_after - payload.not_before == 60 + 15 * 60
    assert signedop.to_json(payload) == envelope.payload  # the one canonical spelling


def test_cosign_adds_a_signature_over_the_same_bytes(desk: Desk, signed: Path) -> None:
    """op cosign keeps the payload byte for byte and the first signature, and adds the second key's."""
    first, both = desk.envelope("d1.op"), desk.envelope("d.op")
    assert both.payload == first.payload
    assert both.signatures[0] == first.signatures[0]
    assert len(both.signatures) == 2 and both.signatures[1].keyid != first.signatures[0].keyid


def test_summary_says_what_is_signed(desk: Desk) -> None:
    """op sign prints the action in words a person checks before typing the vmid."""
    desk.write("s.json", proposal())
    done = desk.run("op", "sign", "--key", "alice.key", "--role", "destroyer", "--reason", "OPS-9", "s.json",
                    stdin="105\n")
    assert done.returncode == 0, done.stderr
    assert "DESTROY guest 105 (qemu) on pve1@cluster-a, purge=yes, destroy unreferenced disks=NO" in done.stderr
    assert "class DESTRUCTIVE, planned from config digest 3f2a3f2a... while stopped" in done.stderr
    assert "valid 15 min, until" in done.stderr and "role destroyer" in done.stderr and "reason: OPS-9" in done.stderr
    assert "type the vmid (105)" in done.stderr


@pytest.mark.parametrize("typed", ["106\n", "\n", "", "105 and more\n"])
def test_typed_vmid_must_match(desk: Desk, typed: str) -> None:
    """Anything but the vmid typed back refuses: nothing is signed or written."""
    desk.write("m.json", proposal())
    done = desk.run("op", "sign", "--key", "alice.key", "--role", "destroyer", "--out", "m.op", "m.json",
                    stdin=typed)
    assert done.returncode == 1
    assert "nothing signed" in done.stderr
    assert not (desk.path / "m.op").exists() and done.stdout == ""


def test_proposal_on_stdin_asks_the_terminal(desk: Desk) -> None:
    """A proposal piped on stdin cannot also confirm the vmid: without a terminal, sign refuses (or --yes)."""
    document = json.dumps(proposal())
    args = ("op", "sign", "--key", "alice.key", "--role", "destroyer", "-")
    refused = desk.run(*args, stdin=document)
    assert refused.returncode == 2 and "no terminal" in refused.stderr and refused.stdout == ""
    assert desk.run(*args[:-1], "--yes", "-", stdin=document).returncode == 0


def test_sign_takes_a_plan_pending_entry(desk: Desk) -> None:
    """A plan --json "pending" entry (the action part flat, with its sha256) signs; defaults are filled in."""
    action = action_of(audience=AUDIENCE, vmid=105, guest_type="qemu", kind="config.disk_detach",
                       params={"set": {}, "delete": ["scsi1"]}, class_="DESTRUCTIVE", digest=DIGEST,
                       run_state="stopped")
    flat = {**action, "params": {"set": {}, "delete": ["scsi1"]}, "descriptor_sha256": "ab" * 32,
            "challenge": challenge.issue(SECRET, action, now=time.time())}
    desk.write("p.json", flat)
    done = desk.run("op", "sign", "--key", "alice.key", "--role", "destroyer", "--yes", "p.json")
    assert done.returncode == 0, done.stderr
    payload = parse_payload(signedop.parse_envelope_json(done.stdout.encode()).payload)
    assert dict(payload.params) == {"set": {}, "delete": ("scsi1",), "force": False}
    assert "DETACH DISKS of guest 105 (qemu) on pve1@cluster-a, remove scsi1, force=NO" in done.stderr


@pytest.mark.parametrize(("doc", "args", "message"), [
    ({**proposal(), "challenge": None}, (), "needs the executor's challenge"),
    (proposal(), ("--ttl", "1h"), "give --ttl 59m or less"),
    (GROW_TO_ZERO, (), "proposal.action: params.size: must be an integer"),
    ('{"challenge": null, "challenge": "1.2"}', (), "duplicate key 'challenge'"),
])
def test_sign_refuses_what_the_gate_would(desk: Desk, doc: object, args: tuple[str, ...], message: str) -> None:
    """A destructive op without challenge, a TTL past the ceiling, bad params or a duplicate key: exit 2."""
    (desk.path / "bad.json").write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    done = desk.run("op", "sign", "--key", "alice.key", "--role", "destroyer", "--yes", *args, "bad.json")
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr


def test_cosign_refuses_a_key_that_signed(desk: Desk, signed: Path) -> None:
    """The same key twice adds nothing to a threshold: cosign refuses it and leaves the file as it was."""
    before = signed.read_bytes()
    done = desk.run("op", "cosign", "--key", "bob.key", "--yes", "d.op")
    assert done.returncode == 2 and "already signed this op" in done.stderr
    assert signed.read_bytes() == before


def test_verify_accepts_the_cosigned_op(desk: Desk, signed: Path) -> None:
    """op verify runs steps 1-11; without the gate secret it says the challenge was not checked."""
    done = desk.run("op", "verify", "--trust", str(desk.trust), "--audience", AUDIENCE, "d.op")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("VERIFIED")
    assert "challenge NOT checked" in done.stdout
    (desk.path / "gate.secret").write_bytes(SECRET)
    full = desk.run("op", "verify", "--trust", str(desk.trust), "--gate-secret", "gate.secret", "d.op")
    assert full.returncode == 0, full.stdout
    assert "NOT checked" not in full.stdout


def test_verify_checks_the_challenge_with_the_secret(desk: Desk, signed: Path) -> None:
    """Given another executor's secret, the challenge does not verify: exit 2, CHALLENGE_INVALID."""
    (desk.path / "other.secret").write_bytes(b"x" * 32)
    done = desk.run("op", "verify", "--trust", str(desk.trust), "--gate-secret", "other.secret", "d.op")
    assert done.returncode == 2
    assert done.stdout.startswith("REFUSED CHALLENGE_INVALID")


def test_verify_refusals(desk: Desk, signed: Path, tmp_path: Path) -> None:
    """Expired, for another executor, an unknown key, one signature short of the threshold: exit 2 with the reason."""
    trust = str(desk.trust)
    payload = parse_payload(desk.envelope("d.op").payload)
    bob_only = write_store(tmp_path, to_toml({"version": 8, "roles": default_roles()}) + "\n"
                           + entry(desk.entries["bob"], ["destroyer"]))
    cases = {
        "EXPIRED": ("--trust", trust, "--at", str(payload.not_after), "d.op"),
        "WRONG_AUDIENCE": ("--trust", trust, "--audience", "pve1@cluster-b", "d.op"),
        "UNKNOWN_KEY": ("--trust", str(bob_only), "d.op"),
        "THRESHOLD_NOT_MET": ("--trust", trust, "d1.op"),
    }
    for reason, args in cases.items():
        done = desk.run("op", "verify", *args)
        assert done.returncode == 2, (reason, done.stdout, done.stderr)
        assert done.stdout.startswith(f"REFUSED {reason}:"), (reason, done.stdout)


def test_the_signer_sees_hidden_characters_escaped() -> None:
    """Line and paragraph separators, private-use characters and letters that print blank are shown escaped,
    like control and format characters: what a signer reads is what is signed."""
    from opctl.doc import visible  # noqa: PLC0415

    assert visible("a\u2028b\u2029c\u3164d\ue000e\u202ef") == "a\\u2028b\\u2029c\\u3164d\\ue000e\\u202ef"
