"""A TLS failure towards Proxmox names its cause: an untrusted certificate says so and names --pve-ca-file.

Real TLS: fakepve over HTTPS, the executor given a CA that did not sign fakepve's certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from executor.pve.node import Connection, ProxmoxNode, PveUnavailableError
from tests.certs import make_pki
from tests.executor_helpers import ROOT, cli


@pytest.fixture(name="wrong_ca")
def _wrong_ca(tmp_path: Path) -> str:
    """A CA certificate (PEM) that did not sign fakepve's certificate."""
    return make_pki(tmp_path / "pki").other_ca


def test_an_untrusted_certificate_says_so_and_chains_the_tls_error(connect: Callable[..., Connection],
                                                                    wrong_ca: str) -> None:
    """Login with the wrong CA: the message names the certificate problem and the flag; the cause is chained."""
    with pytest.raises(PveUnavailableError) as caught:
        ProxmoxNode(connect(ca_file=wrong_ca))
    message = str(caught.value)
    assert "certificate" in message and "--pve-ca-file" in message, message
    assert "secret" not in message
    assert isinstance(caught.value.__cause__, requests.exceptions.SSLError)


def test_the_cli_line_names_the_certificate_problem(fakepve: Any, wrong_ca: str, tmp_path: Path) -> None:
    """`pve-executor run --once` with the wrong CA exits 1 with one line that says what to fix."""
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests: []\n")
    result = subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", wrong_ca, "127.0.0.1:1", tmp_path, "run",
                                "--once", "--desired", str(desired), "--state-dir", str(tmp_path / "state")),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("pve-executor: Proxmox: ") and "certificate" in line and "--pve-ca-file" in line, line
    assert "secret" not in result.stderr


@pytest.fixture(name="elsewhere")
def _elsewhere(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A TLS listener on 127.0.0.1 whose certificate (its own CA) names only pve1.example: (port, its CA file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pve1.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("pve1.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True):
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], str(tmp_path / "cert.pem")
    listener.close()


def test_a_certificate_for_another_name_says_to_fix_the_url(connect: Callable[..., Connection],
                                                             elsewhere: tuple[int, str]) -> None:
    """A trusted certificate that does not hold the host name asked for: the advice is --pve-url, not the CA."""
    port, cafile = elsewhere
    with pytest.raises(PveUnavailableError) as caught:
        ProxmoxNode(connect(port=port, ca_file=cafile))
    message = str(caught.value)
    assert "not valid for" in message and "--pve-url" in message and "--pve-ca-file" not in message, message
