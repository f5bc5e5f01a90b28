"""A TLS failure towards Proxmox names its cause: an untrusted certificate says so and names --pve-ca-file.

Real TLS: fakepve over HTTPS, the executor given a CA that did not sign fakepve's certificate.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

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
