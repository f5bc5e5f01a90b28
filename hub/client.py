"""``pve-hub apply | history | show | status``: the operator's side of the hub, over gRPC.

``apply`` checks the file with the executor's own loader (``desiredfile``), shows what changes against the
version it replaces, reads the latest version again once the key is loaded (its passphrase typed) and refuses
if another apply came first, before it signs, then signs with ``opctl.desired``'s signing code and uploads with
the version it expects: if another apply came first after all, the hub refuses it naming both versions, and
nothing is stored.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import getpass
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

import desiredfile
from common.grpcserver import OWN_SUBCHANNELS, ClientTls, channel_credentials
from hub import status as status_view
from hub.server import MAX_MESSAGE_BYTES
from hub.v1 import hub_pb2 as pb
from hub.v1 import hub_pb2_grpc as pb_grpc
from opctl.desired import read_desired, sign_document
from opctl.doc import OpError
from opctl.keys import load_private
from safety import desireddoc
from safety.refusal import Refused

HUB_CLIENT = ("hub_ca", "hub_client_cert", "hub_client_key")
TIMEOUT = 30.0
T = TypeVar("T")


class Failed(Exception):  # noqa: N818 (what the command exits 1 for)
    """The hub refused or failed the call: exit 1."""


@contextmanager
def _stub(args: argparse.Namespace) -> Iterator[pb_grpc.HubServiceStub]:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), OWN_SUBCHANNELS]
    if args.hub_ca or args.hub_client_cert:
        tls = ClientTls(ca=args.hub_ca, cert=args.hub_client_cert, key=args.hub_client_key, names=HUB_CLIENT)
        channel = grpc.secure_channel(args.hub, channel_credentials(tls), options=options)
    else:
        channel = grpc.insecure_channel(args.hub, options=options)
    with channel:
        yield pb_grpc.HubServiceStub(channel)


def _failure(what: str, exc: grpc.RpcError) -> Exception:
    """An error the hub answered: OpError when our input is bad (exit 2), else Failed (exit 1)."""
    code, details = exc.code(), exc.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return OpError(f"{what}: the hub refused it: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Failed(f"{what}: the hub is unavailable: {details}")
    return Failed(f"{what}: {code.name}: {details}")


def _call(what: str, call: Callable[..., T], request: Message) -> T:
    """``call(request)``, its error as _failure says."""
    try:
        return call(request, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        raise _failure(what, exc) from exc


def _latest(stub: pb_grpc.HubServiceStub, cluster: str) -> pb.Document | None:
    """The cluster's latest document, None when it has none yet."""
    try:
        document: pb.Document = stub.GetDocument(pb.GetDocumentRequest(cluster=cluster), timeout=TIMEOUT).document
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise _failure("reading the latest version", exc) from exc
    return document


def desired_text(document: pb.Document) -> str:
    """The desired text inside a stored envelope (read, not verified: the nodes verify)."""
    try:
        return desireddoc.parse_payload(desireddoc.parse_envelope(document.envelope).payload).desired
    except Refused as exc:
        raise Failed(f"version {document.version} at the hub does not parse: {exc.detail}") from exc


def _diff(old: str, new: str, old_name: str, new_name: str) -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), old_name, new_name)
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _sign(args: argparse.Namespace, key: Ed25519PrivateKey, text: str, version: int, previous_sha256: str) -> bytes:
    """The envelope of ``text`` as ``version``, signed with ``key``; OpError naming the field the verifier refuses."""
    author = args.author or f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        envelope = sign_document(text, key, cluster=args.cluster, version=version, previous_sha256=previous_sha256,
                                 role=args.role, author=author, message=args.message, now=time.time())
    except Refused as exc:
        raise OpError(f"{exc.detail}; nothing signed") from exc
    return desireddoc.to_bytes(envelope)


def _still_latest(stub: pb_grpc.HubServiceStub, cluster: str, version: int, sha256: str) -> None:
    """Right before signing: ``version`` (``sha256``) is still the latest, else Failed and nothing is signed.

    Two documents signed under one version are both valid to every node, and a hub broken into could show one
    to some nodes and the other to the rest (docs/SAFETY.md §6.9): the loser of a race must never be signed.
    The time an operator takes to read the diff and type a passphrase is the race's window; after this read
    only the signing and the upload remain.
    """
    latest = _latest(stub, cluster)
    now = (latest.version, latest.payload_sha256) if latest is not None else (0, "")
    if now != (version, sha256):
        raise Failed(f"version {now[0]} of cluster {cluster} was applied since the diff above (against version "
                     f"{version}); nothing signed, nothing applied: run it again to see the diff against it")


def apply(args: argparse.Namespace) -> int:
    """Check FILE, show the diff against the latest version, sign it as the next one and upload it."""
    text = read_desired(args.file)
    try:
        guests = len(desiredfile.parse(text, args.file))
    except desiredfile.DesiredFileError as exc:
        raise OpError(str(exc)) from exc
    with _stub(args) as stub:
        latest = _latest(stub, args.cluster)
        current = latest.version if latest is not None else 0
        if args.check_version is not None and args.check_version != current:
            raise Failed(f"--check-version {args.check_version}: the latest version of cluster {args.cluster} is "
                         f"{current}; nothing applied (read it with pve-hub show {current})")
        old = desired_text(latest) if latest is not None else ""
        diff = _diff(old, text, f"version {current}" if current else "(no version)", args.file)
        print(diff or f"no change to the desired text of version {current}", end="" if diff else "\n")
        if args.dry_run:
            print(f"dry run: version {current + 1} of cluster {args.cluster} ({guests} guests) not signed, not sent",
                  file=sys.stderr)
            return 0
        key = load_private(args.key, args.passphrase_file)  # may wait for a passphrase: the hub may move meanwhile
        previous = latest.payload_sha256 if latest is not None else ""
        _still_latest(stub, args.cluster, current, previous)
        envelope = _sign(args, key, text, current + 1, previous)
        answer = _call(f"--hub {args.hub}", stub.Apply, pb.ApplyRequest(cluster=args.cluster, expected_version=current,
                                                            envelope=envelope))
    print(f"applied version {answer.version} of cluster {args.cluster} ({guests} guests); "
          f"sha256 {answer.payload_sha256}", file=sys.stderr)
    return 0


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return dt.datetime.fromtimestamp(unix_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history(args: argparse.Namespace) -> int:
    """The cluster's versions, newest first."""
    with _stub(args) as stub:
        answer = _call(f"--hub {args.hub}", stub.History, pb.HistoryRequest(cluster=args.cluster, limit=args.limit))
    entries = answer.entries
    if not entries:
        print(f"cluster {args.cluster} has no version yet")
        return 0
    print(f"{'VERSION':>7}  {'STORED':20}  {'SHA256':12}  {'SIZE':>9}  {'AUTHOR':24}  MESSAGE")
    for entry in entries:
        print(f"{entry.version:>7}  {_when(entry.stored_unix_ms):20}  {entry.payload_sha256[:12]:12}  "
              f"{entry.size:>9}  {entry.author[:24]:24}  {entry.message}")
    return 0


def show(args: argparse.Namespace) -> int:
    """One version's metadata (on stderr) and desired text (on stdout, so it can be applied again)."""
    with _stub(args) as stub:
        answer = _call(f"show {args.version}", stub.GetDocument,
                       pb.GetDocumentRequest(cluster=args.cluster, version=args.version))
    document = answer.document
    text = desired_text(document)
    print(f"# cluster {document.cluster}, version {document.version}, sha256 {document.payload_sha256}\n"
          f"# stored {_when(document.stored_unix_ms)} by {document.author}: {document.message}", file=sys.stderr)
    print(text, end="" if text.endswith("\n") or not text else "\n")
    return 0


def status(args: argparse.Namespace) -> int:
    """The cluster at a glance (or one node's guests with --node); the exit code says whether all is in sync."""
    now = time.time()
    with _stub(args) as stub:
        if args.node:
            try:
                node = stub.GetNode(pb.GetNodeRequest(cluster=args.cluster, node=args.node), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    raise Failed(f"--node {args.node}: {exc.details()}") from exc
                raise _failure("status", exc) from exc
            print(json.dumps(status_view.node_detail_json(args.cluster, node, now), indent=2) if args.json
                  else "\n".join(status_view.render_node(args.cluster, node, now)))
            return status_view.exit_code([node.status])
        answer = _call(f"--hub {args.hub}", stub.Status, pb.StatusRequest(cluster=args.cluster))
    print(json.dumps(status_view.cluster_json(args.cluster, answer, now), indent=2) if args.json
          else "\n".join(status_view.render_cluster(args.cluster, answer, now)))
    return status_view.exit_code(answer.nodes)
