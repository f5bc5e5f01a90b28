"""The operator's commands, ``opctl`` or ``pve-executor`` (docs/SAFETY.md §11): keys, trust, pending, op ...

None of them talks to Proxmox: the offline ones (``keys generate``, ``trust check``, ``op sign``,
``op cosign``, ``op verify``) read and write files; the others call the executor API. Exit status:
0 done, 1 refused (by the executor, the gate, or the signer who typed another vmid) or the API failed,
2 bad input or an op that does not verify; ``op status`` (and ``op submit --wait``) 3 when the op is
still waiting or running. A reader that closes the pipe early (``| head -1``) ends the command quietly
with 141, as SIGPIPE ends a shell tool.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from common.version import add_version

COMMANDS = frozenset({"keys", "trust", "pending", "op", "desired"})
# The daemon's default socket (executor.config.DEFAULT_LISTEN; a test keeps the two equal, opctl never imports it).
DEFAULT_API = "unix:/run/pve-reconcile/executor.sock"
API_ENV = "PVE_EXECUTOR_API"
# Imported when run, so `--help` and the daemon do not load gRPC stubs and key code for nothing.
HANDLERS: Mapping[tuple[str, str | None], str] = {
    ("keys", "generate"): "keys:generate",
    ("trust", "check"): "keys:check",
    ("pending", None): "api:pending",
    ("op", "propose"): "api:propose",
    ("op", "sign"): "sign:sign",
    ("op", "cosign"): "sign:cosign",
    ("op", "verify"): "sign:verify",
    ("op", "submit"): "api:submit",
    ("op", "status"): "status:status",
    ("op", "revoke"): "api:revoke",
    ("op", "undo"): "undo:undo",
    ("desired", "sign"): "desired:sign",
    ("desired", "cosign"): "desired:cosign",
    ("desired", "verify"): "desired:verify",
}
DEFAULT_TTL = "15m"
CALL_TIMEOUT, WAIT_TIMEOUT = 30.0, 300.0
EXIT_CODES = "exit codes: 0 ok; 1 refused (by the executor, the gate or the signer) or the API failed; " \
             "2 usage or configuration error (bad flag, bad file, an op that does not verify)"
STATUS_EXIT_CODES = "exit codes: 0 the op ran ok; 1 refused, revoked, failed, or no trace of it; 3 still waiting " \
                    "or running (with --wait: after --timeout); 2 usage or configuration error. An OP_ID naming " \
                    "several ops (see --sha256): 3 while one waits or runs, 0 only when every one ran ok, else 1"
DESIRED_EXIT_CODES = "exit codes: 0 ok (verify: the document verifies); 2 usage or configuration error, a desired " \
                     "file the executor's loader refuses, or a document that does not verify (REFUSED REASON: why)"
BROKEN_PIPE = 141  # what a shell reports for a tool killed by SIGPIPE: the reader (head -1) went away


def api_target(args: argparse.Namespace) -> str:
    """The executor API's address (unix:PATH or HOST:PORT): --api, else PVE_EXECUTOR_API, else the socket."""
    return str(args.api or os.environ.get(API_ENV) or DEFAULT_API)


def add_api_flags(parser: argparse.ArgumentParser) -> None:
    """Where the executor API is and how to reach it (client TLS flags ``--api-ca/--api-client-cert/-key``)."""
    parser.add_argument("--api", metavar="unix:PATH|HOST:PORT",
                        help=f"executor API [{API_ENV}] (default: listen in --config, else {DEFAULT_API})")
    parser.add_argument("--config", metavar="FILE",
                        help="the executor's TOML settings (executor.toml): the API address (listen) and its TLS "
                             "[PVE_EXECUTOR_CONFIG]")
    parser.add_argument("--api-ca", metavar="PEM", help="CA of the API's certificate (turns TLS on)")
    parser.add_argument("--api-client-cert", metavar="PEM", help="client certificate for mutual TLS")
    parser.add_argument("--api-client-key", metavar="PEM", help="client key for mutual TLS")
    # The spellings before the shared vocabulary: still accepted, no longer shown.
    parser.add_argument("--api-cert", dest="api_client_cert", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", dest="api_client_key", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, metavar="S",
                        help=f"seconds per API call (default {CALL_TIMEOUT:g}); with --wait, how long to wait for "
                             f"the op's fate (default {WAIT_TIMEOUT:g})")


def _keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="subcommand", required=True)
    generate = keys.add_parser("generate", help="a new Ed25519 key (PKCS8 PEM, 0600); prints its [[keys]] entry")
    generate.add_argument("--out", required=True, metavar="FILE", help="the private key file (never overwritten)")
    generate.add_argument("--passphrase-file", metavar="F", help="encrypt the key with the first line of F")
    generate.add_argument("--owner", metavar="EMAIL", help="who holds the key (default user@host)")
    generate.add_argument("--not-after", metavar="DATE", help="expiry, e.g. 2027-06-30 (default: in a year)")
    trust = sub.add_parser("trust", help="the trust store").add_subparsers(dest="subcommand", required=True)
    check = trust.add_parser("check", help="load it as the executor would; list roles and keys; exit 2 if bad")
    check.add_argument("file", metavar="FILE", help="the trust store (TOML), e.g. /etc/pve-reconcile/trust.toml")
    check.add_argument("--state-dir", metavar="DIR",
                       help="the executor's state directory: also refuse what it would (a version below the floor "
                            "it recorded, or that version with other content)")


def _signing(parser: argparse.ArgumentParser, *, role: bool) -> None:
    parser.add_argument("--key", required=True, metavar="KEYFILE", help="your private key (PKCS8 PEM)")
    parser.add_argument("--passphrase-file", metavar="F", help="the key's passphrase (default: asked)")
    if role:
        parser.add_argument("--role", required=True, help="the trust store role you sign as")
        parser.add_argument("--ttl", metavar="DURATION", help=f"how long it stays valid (default {DEFAULT_TTL})")
        parser.add_argument("--reason", help="why (a ticket, a sentence); kept in the journal")


def _count(text: str) -> int:
    """``--limit``: 1 to 200."""
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number from 1 to 200")
    return int(text)


def _op(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ops = sub.add_parser("op", help="signed operations").add_subparsers(dest="subcommand", required=True)
    propose = ops.add_parser("propose", help="ProposeOp: the executor describes the op; mutates nothing")
    propose.add_argument("--vmid", type=int, required=True)
    propose.add_argument("kind", metavar="KIND", help="guest.destroy, config.disk_detach, disk.resize, ...")
    propose.add_argument("params", metavar="KEY=VALUE", nargs="*", help="params (set.KEY=VALUE for config writes)")
    propose.add_argument("--params-json", metavar="JSON", help="params as a JSON object (KEY=VALUE overrides)")
    sign = ops.add_parser("sign", help="sign a proposal or pending entry (offline); prints what is signed")
    _signing(sign, role=True)
    sign.add_argument("--yes", action="store_true", help="do not ask for the vmid (you checked the summary)")
    sign.add_argument("--out", metavar="FILE", help="the envelope file (default stdout)")
    sign.add_argument("proposal", metavar="PROPOSAL", nargs="?",
                      help="op propose output, or a pending/plan --json entry (a file, - for stdin)")
    sign.add_argument("--pending", type=int, metavar="N", help="instead of PROPOSAL: entry N of `pending`")
    sign.add_argument("--vmid", type=int, metavar="VMID", help="instead of PROPOSAL: the one pending entry of VMID")
    add_api_flags(sign)  # for --pending and --vmid
    cosign = ops.add_parser("cosign", help="add your signature over the same payload bytes (offline)")
    _signing(cosign, role=False)
    cosign.add_argument("--yes", action="store_true", help="do not ask for the vmid")
    cosign.add_argument("--out", metavar="FILE", help="write here instead of back to ENVELOPE (- for stdout)")
    cosign.add_argument("envelope", metavar="ENVELOPE", help="the envelope op sign wrote (- for stdin)")
    verify = ops.add_parser("verify", help="check an envelope offline (steps 1-11); exit 2 with the refusal")
    verify.add_argument("--trust", required=True, metavar="FILE", help="a copy of the node's trust store")
    verify.add_argument("--audience", metavar="NODE@CLUSTER", help="the executor it is for (default: the op's)")
    verify.add_argument("--at", type=float, metavar="UNIX", help="check as of this time (default now)")
    verify.add_argument("--gate-secret", metavar="FILE", help="the executor's state_dir/gate.secret (checks the "
                                                              "challenge too)")
    verify.add_argument("envelope", metavar="ENVELOPE", help="the signed op to check (- for stdin)")
    submit = ops.add_parser("submit", help="SubmitOp: exit 0 accepted (queued), 1 refused; --wait: its fate",
                            epilog=f"without --wait: {EXIT_CODES}; with --wait: {STATUS_EXIT_CODES}")
    submit.add_argument("envelope", metavar="ENVELOPE", help="the signed op (op sign/cosign output; - for stdin)")
    submit.add_argument("--wait", action="store_true", help="then wait for its fate, as op status OP_ID --wait")
    submit.add_argument("--json", action="store_true", help="with --wait: the fate as JSON")
    status = ops.add_parser("status", help="what became of a signed op: WAITING, RUNNING, RAN, REFUSED or REVOKED",
                            epilog=STATUS_EXIT_CODES)
    status.add_argument("op_id", metavar="OP_ID", nargs="?",
                        help="the op's id (op sign and op submit print it); none: the most recent signed ops")
    status.add_argument("--wait", action="store_true", help="wait until it ran or was refused (see --timeout)")
    status.add_argument("--json", action="store_true", help="as JSON (an array when OP_ID names several ops)")
    status.add_argument("--sha256", metavar="HEX", default="",
                        help="with OP_ID: only the op whose payload sha256 starts with HEX (8-64 hex digits; op "
                             "status prints each op's when OP_ID names several)")
    status.add_argument("--limit", type=_count, default=20, metavar="N",
                        help="without OP_ID: how many, 1-200 (default 20)")
    revoke = ops.add_parser("revoke", help="RevokeOp: a signed op.revoke; the op can then never run")
    revoke.add_argument("op_id", metavar="OP_ID", help="the id of the signed op to veto")
    _signing(revoke, role=True)
    revoke.add_argument("--vmid", type=int, required=True, help="the guest the op is for")
    revoke.add_argument("--audience", metavar="NODE@CLUSTER", help="default: asked of the executor (ProposeOp)")
    revoke.add_argument("--guest-type", choices=("qemu", "lxc"), default="qemu", help="with --audience")
    undo = ops.add_parser("undo", help="propose the inverse of an op that ran, from its before-image")
    undo.add_argument("op_id", metavar="OP_ID", help="the id of a signed op that ran")
    for parser in (propose, submit, status, revoke, undo):
        add_api_flags(parser)


def _desired(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    docs = sub.add_parser("desired", help="hub documents: a cluster's desired state, signed (offline)",
                          epilog=DESIRED_EXIT_CODES)
    commands = docs.add_subparsers(dest="subcommand", required=True, metavar="<command>", help="sign | cosign | verify")
    sign = commands.add_parser("sign", help="check a desired file with the executor's loader and sign it as a "
                                            "hub document", epilog=DESIRED_EXIT_CODES)
    sign.add_argument("file", metavar="FILE", help="the desired file (YAML; - for stdin)")
    sign.add_argument("--cluster", required=True, help="the cluster it is for (the @CLUSTER of its executors)")
    sign.add_argument("--version", type=int, required=True, metavar="N", help="1, then one more than the last")
    sign.add_argument("--previous-sha256", metavar="H", help="the sha256 of version N-1 (its sign or verify "
                                                             "printed it); not for version 1")
    _signing(sign, role=False)
    sign.add_argument("--role", required=True, help="the trust store role naming desired.apply you sign as")
    sign.add_argument("--message", required=True, metavar="M", help="what changes and why (one line)")
    sign.add_argument("--author", help="who (default user@host)")
    sign.add_argument("--out", metavar="FILE", help="the envelope file (default stdout)")
    cosign = commands.add_parser("cosign", help="add your signature to a document (a role's threshold of 2 or more)",
                                 epilog=DESIRED_EXIT_CODES)
    _signing(cosign, role=False)
    cosign.add_argument("--out", metavar="FILE", help="write here instead of back to ENVELOPE (- for stdout)")
    cosign.add_argument("envelope", metavar="ENVELOPE", help="the document desired sign wrote")
    verify = commands.add_parser("verify", help="check a document as an executor would; exit 2 with the refusal",
                                 epilog=DESIRED_EXIT_CODES)
    verify.add_argument("envelope", metavar="ENVELOPE", help="the document (- for stdin)")
    verify.add_argument("--trust", required=True, metavar="FILE", help="a copy of the node's trust store")
    verify.add_argument("--audience", required=True, metavar="NODE@CLUSTER", help="the executor it is checked for")
    verify.add_argument("--cluster", help="default: the @CLUSTER of --audience")
    verify.add_argument("--held-version", type=int, metavar="N", help="the version the executor holds (refuses "
                                                                      "a rollback or a fork of it)")
    verify.add_argument("--held-sha256", metavar="H", help="the sha256 of the version held")
    verify.add_argument("--at", type=float, metavar="UNIX", help="check key expiry as of this time (default now)")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add keys, trust, pending, op and desired to ``pve-executor``'s subcommands."""
    _keys(sub)
    pending = sub.add_parser("pending", help="ListPending: refused actions waiting for approval")
    pending.add_argument("--json", action="store_true", help="entries op sign accepts")
    add_api_flags(pending)
    _op(sub)
    _desired(sub)
    _epilogs(sub)


def _epilogs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Each command's --help ends with its exit codes (EXIT_CODES unless it set its own)."""
    for parser in sub.choices.values():
        parser.epilog = parser.epilog or EXIT_CODES
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _epilogs(action)


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    module, function = HANDLERS[(args.command, getattr(args, "subcommand", None))].split(":")
    return cast("Callable[[argparse.Namespace], int]", getattr(importlib.import_module(f"opctl.{module}"),
                                                                 function))


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``opctl``: the same commands as ``pve-executor keys|trust|pending|op``."""
    top = argparse.ArgumentParser(prog="opctl", description="pve-reconcile operator's tool: signed operations",
                                  epilog=EXIT_CODES)
    add_version(top, "opctl")
    add_parsers(top.add_subparsers(dest="command", required=True))
    return main(top.parse_args(argv), prog="opctl")


def _timeouts(args: argparse.Namespace) -> None:
    """``--timeout``: per call (default 30 s); with --wait, the whole wait (default 300 s)."""
    given = getattr(args, "timeout", None)
    args.wait_timeout = WAIT_TIMEOUT if given is None else given
    args.timeout = CALL_TIMEOUT if given is None else given


def _quiet_stdout() -> None:
    """The reader of standard output went away (``| head -1``): nothing more to say, and no traceback at exit."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(args: argparse.Namespace, *, prog: str = "pve-executor") -> int:
    """Run one operator command; errors are one line on stderr naming the program and the command."""
    import grpc  # noqa: PLC0415 - see HANDLERS

    from common.config import ConfigError  # noqa: PLC0415
    from opctl.doc import OpError, api_error, refusal_text  # noqa: PLC0415
    from safety.refusal import Refused  # noqa: PLC0415

    name = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))
    args.prog = prog
    _timeouts(args)
    try:
        code = _handler(args)(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then one more case below
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE
    except OpError as exc:
        print(f"{prog} {name}: {exc}", file=sys.stderr)
        return exc.code
    except (Refused, ConfigError) as exc:
        print(f"{prog} {name}: {refusal_text(exc) if isinstance(exc, Refused) else exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"{prog} {name}: {api_error(exc)}", file=sys.stderr)
        return 1
