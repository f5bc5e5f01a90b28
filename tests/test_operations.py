"""Operations: TLS and mutual TLS, layered config, metrics, two planners, health checks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest

from common.grpcserver import ClientTls, ServerTls
from executor.desired import Declared
from executor.planner_client import PlannerClient, PlannerRefusedError, PlannerUnavailableError
from planner import server
from planner.v1 import planner_pb2 as pb
from tests.builders import RUNNING, STOPPED, have, want
from tests.certs import Pki, make_pki

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
MAX_EXPOSURE = 1.8  # systemd-analyze's "OK"; today's units score exactly this
ONE_GUEST = ([want(100, state=RUNNING)], [have(100, state=STOPPED)])


@pytest.fixture(name="pki", scope="module")
def _pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(name="mtls_planner")
def _mtls_planner(pki: Pki) -> Iterator[server.Running]:
    running = server.start("127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key,
                                                        client_ca=pki.ca))
    yield running
    server.stop(running, 1)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PVE_PLANNER_", "PVE_EXECUTOR_"))}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False, env={**clean, **(env or {})})


def test_mutual_tls_between_executor_and_planner(mtls_planner: server.Running, pki: Pki) -> None:
    """With a client CA set, only clients holding a certificate it signed get a plan."""
    target = f"127.0.0.1:{mtls_planner.port}"
    trusted = PlannerClient(target, tls=ClientTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key))
    assert len(trusted.plan(*ONE_GUEST).actions) == 1
    for refused in (ClientTls(ca=pki.ca),  # no client certificate
                    ClientTls(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)):  # signed by another CA
        with pytest.raises(PlannerUnavailableError):
            PlannerClient(target, tls=refused, deadline=3, attempts=1).plan(*ONE_GUEST)
    with pytest.raises(PlannerUnavailableError):
        PlannerClient(target, deadline=3, attempts=1).plan(*ONE_GUEST)  # plaintext


def test_tls_client_verifies_the_planner(pki: Pki) -> None:
    """A TLS planner is reached with its CA, and refused when the client trusts another CA."""
    running = server.start("127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key))
    try:
        target = f"127.0.0.1:{running.port}"
        assert PlannerClient(target, tls=ClientTls(ca=pki.ca)).plan(*ONE_GUEST).actions
        with pytest.raises(PlannerUnavailableError):
            PlannerClient(target, tls=ClientTls(ca=pki.other_ca), deadline=3, attempts=1).plan(*ONE_GUEST)
    finally:
        server.stop(running, 1)


def test_two_planners_behind_one_channel_and_one_going_away() -> None:
    """round_robin over two planners spreads the calls; when one stops, the other serves them all."""
    first, second = server.start("127.0.0.1:0"), server.start("127.0.0.1:0")
    try:
        client = PlannerClient(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}", deadline=5)
        for _ in range(20):
            client.plan(*ONE_GUEST)

        def served(running: server.Running) -> float:
            return float(running.metrics.plans.labels("ok")._value.get())

        assert served(first) > 0 and served(second) > 0
        server.stop(first, 0)
        before = served(second)
        for _ in range(10):
            assert client.plan(*ONE_GUEST).actions
        assert served(second) == before + 10
    finally:
        server.stop(second, 1)


def test_planner_metrics_endpoint(tmp_path: Path) -> None:
    """/metrics shows plans by outcome, latency and size, in Prometheus' naming."""
    running = server.start("127.0.0.1:0", metrics_listen="127.0.0.1:0")
    try:
        client = PlannerClient(f"127.0.0.1:{running.port}")
        client.plan(*ONE_GUEST)
        with pytest.raises(PlannerRefusedError):
            client.plan([want(0)], [])
        assert running.metrics_endpoint is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_endpoint.port}/metrics", timeout=5).read()
        body = text.decode()
        assert 'pve_planner_plans_total{outcome="ok"} 1.0' in body
        assert 'pve_planner_plans_total{outcome="invalid"} 1.0' in body
        assert "pve_planner_plan_duration_seconds_count 1.0" in body
        assert "pve_planner_plan_actions_sum 1.0" in body
    finally:
        server.stop(running, 1)


def test_executor_metrics_count_ticks_actions_and_waits(fakepve: Any, make_engine: Any) -> None:
    """Ticks, actions by kind and outcome, task waits and journal appends are counted; no vmid label."""
    fakepve.add_vm(100, "web", status="stopped")
    engine = make_engine([Declared(vmid=100, state="running")])
    engine.tick(wait=True)
    body = generate_latest(engine.metrics.registry).decode()
    assert 'pve_executor_ticks_total{outcome="ok"} 1.0' in body
    assert 'pve_executor_actions_total{kind="start",outcome="ok"} 1.0' in body
    assert "pve_executor_task_wait_seconds_count 1.0" in body
    assert "pve_executor_journal_append_seconds_count 3.0" in body
    assert "pve_executor_queue_depth 0.0" in body and "pve_executor_in_flight_operations 0.0" in body
    assert "vmid" not in body


def test_config_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    """TOML < PVE_PLANNER_* < flags, shown by --print-config with each value's source."""
    config = tmp_path / "planner.toml"
    config.write_text('listen = "127.0.0.1:6000"\nworkers = 3\ngrace = 5.0\n')
    shown = run("planner", "serve", "--config", str(config), "--print-config", "--workers", "7",
                env={"PVE_PLANNER_GRACE": "2.5"}).stdout
    assert f'listen = "127.0.0.1:6000"  # {config}' in shown
    assert "workers = 7  # --workers" in shown
    assert "grace = 2.5  # PVE_PLANNER_GRACE" in shown
    assert "max_message_mb = 256  # default" in shown


@pytest.mark.parametrize(("toml", "env", "message"), [
    ('workers = "many"\n', {}, "config: workers: must be int, got 'many'"),
    ("colour = 1\n", {}, "config: colour: unknown setting"),
    ("", {"PVE_PLANNER_WORKERS": "0"}, "config: workers: must be at least 1, got 0 (from PVE_PLANNER_WORKERS)"),
    ("", {"PVE_PLANNER_LOG_FORMAT": "xml"}, "config: log_format: must be one of auto, json, console"),
    ('tls_cert = "x.pem"\n', {}, "config: tls_cert: tls_cert and tls_key go together"),
    ("listen = \n", {}, "is not valid TOML"),
])
def test_invalid_config_exits_2_naming_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    """A bad setting anywhere is refused with its key and reason, exit code 2."""
    config = tmp_path / "planner.toml"
    config.write_text(toml)
    result = run("planner", "serve", "--config", str(config), "--listen", "127.0.0.1:0", env=env)
    assert result.returncode == 2 and message in result.stderr


def test_print_config_redacts_secrets(tmp_path: Path) -> None:
    """Secrets from the environment or the file never appear in --print-config."""
    config = tmp_path / "executor.toml"
    config.write_text('node = "pve1"\npve_user = "root@pam"\npve_password = "hunter2-file"\n')
    shown = run("executor", "run", "--config", str(config), "--print-config",
                env={"PVE_EXECUTOR_PVE_TOKEN_SECRET": "tok-3f9a-env"})
    assert shown.returncode == 0
    assert 'pve_password = "<redacted>"' in shown.stdout and 'pve_token_secret = "<redacted>"' in shown.stdout
    assert "hunter2" not in shown.stdout + shown.stderr and "tok-3f9a" not in shown.stdout + shown.stderr


def test_executor_api_beyond_loopback_requires_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    """Binding the API to a non-loopback address without client certificates is refused."""
    password = tmp_path / "pw"
    password.write_text("x")
    base = ["executor", "run", "--node", "pve1", "--pve-user", "root@pam", "--pve-password-file", str(password),
            "--listen", "0.0.0.0:0", "--once"]
    refused = run(*base)
    assert refused.returncode == 2 and "config: listen: 0.0.0.0:0 is beyond loopback" in refused.stderr
    half = run(*base, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key)
    assert half.returncode == 2 and "tls_client_ca" in half.stderr


def test_healthcheck_command_for_containers(pki: Pki, mtls_planner: server.Running) -> None:
    """pve-healthcheck exits 0 on SERVING (plaintext or mutual TLS) and 1 when nobody answers."""
    plain = server.start("127.0.0.1:0")
    try:
        ok = run("common.healthcheck", f"127.0.0.1:{plain.port}")
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
        secured = run("common.healthcheck", f"127.0.0.1:{mtls_planner.port}", "--tls-ca", pki.ca, "--tls-cert",
                      pki.client_cert, "--tls-key", pki.client_key, "--service", "planner.v1.PlannerService")
        assert secured.returncode == 0
    finally:
        server.stop(plain, 0)
    assert run("common.healthcheck", f"127.0.0.1:{plain.port}", "--timeout", "1").returncode == 1


def test_dockerfile_copies_what_exists_and_runs_installed_entry_points() -> None:
    """The image (not buildable here) is linted: sources exist, entry points exist, non-root, health check."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for words in lines:
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (ROOT / source).exists(), source
    scripts = (ROOT / "pyproject.toml").read_text()
    for command in ("pve-planner", "pve-executor", "pve-healthcheck"):
        assert command in text and f'{command} = "' in scripts
    assert text.count("FROM ") >= 2 and "USER " in text and "HEALTHCHECK" in text
    final = text[text.rindex("FROM "):]
    assert "pip install" not in final and "gcc" not in final  # no build tools in the final stage


@pytest.mark.parametrize("unit", ["pve-reconcile-executor.service", "pve-reconcile-planner.service"])
def test_systemd_units_are_hardened(unit: str) -> None:
    """Restart on failure, hardening, and (executor) a state directory and credentials from a file."""
    text = (ROOT / "deploy" / "systemd" / unit).read_text()
    for directive in ("Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                      "ProtectHome=yes", "DynamicUser=yes"):
        assert directive in text, directive
    if "executor" in unit:
        assert "StateDirectory=pve-reconcile" in text and "LoadCredential=" in text
        assert "%d/" in text  # the secret is read from the credentials directory, never from the unit
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[0].endswith(("pve-planner", "pve-executor"))


def tool(name: str) -> str:
    """The path of a command-line tool (the virtualenv's first, e.g. hadolint from the dev extras), or skip."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed here")
    return found


def test_dockerfile_is_clean_under_hadolint() -> None:
    """hadolint finds nothing in the Dockerfile, not even an info (exec-form commands, a numeric USER...)."""
    result = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_healthcheck_reads_its_address_from_the_environment() -> None:
    """An exec-form HEALTHCHECK has no shell: given no address, pve-healthcheck reads PVE_HEALTH_ADDRESS."""
    plain = server.start("127.0.0.1:0")
    try:
        ok = run("common.healthcheck", env={"PVE_HEALTH_ADDRESS": f"127.0.0.1:{plain.port}"})
        assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    finally:
        server.stop(plain, 0)
    missing = run("common.healthcheck", env={"PVE_HEALTH_ADDRESS": ""})
    assert missing.returncode == 2 and "PVE_HEALTH_ADDRESS" in missing.stderr
    assert 'CMD ["/opt/pve-reconcile/bin/pve-healthcheck"]' in (ROOT / "Dockerfile").read_text()


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_systemd_units_verify_cleanly(unit: Path, tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing: no unknown or misspelt directive, no bad value.

    It runs against a scratch root holding the system's units, this unit and stand-ins for the
    commands it starts (verify checks they are executable; they are installed only on a node).
    """
    analyze = tool("systemd-analyze")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
                        None)
    if system_units is None:
        pytest.skip("no systemd unit directory here")
    shutil.copytree(system_units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, tmp_path / "etc/systemd/system" / unit.name)
    for line in unit.read_text().splitlines():
        if line.startswith("ExecStart="):
            command = tmp_path / line.split("=", 1)[1].split()[0].lstrip("/")
            command.parent.mkdir(parents=True, exist_ok=True)
            command.write_text("#!/bin/sh\n")
            command.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", unit.name], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_systemd_units_exposure_is_ok(unit: Path) -> None:
    """systemd-analyze security --offline rates each unit's exposure at most 1.8 ("OK")."""
    result = subprocess.run([tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found[1]) <= MAX_EXPOSURE and found[2] == "OK", found[0]


def test_grpc_status_details_never_carry_secrets(mtls_planner: server.Running, pki: Pki) -> None:
    """A refused TLS handshake reports no key material in its status details."""
    channel = grpc.secure_channel(f"127.0.0.1:{mtls_planner.port}", grpc.ssl_channel_credentials(
        root_certificates=Path(pki.ca).read_bytes()))
    with channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/planner.v1.PlannerService/Plan")(pb.PlanRequest().SerializeToString(), timeout=3)
    assert "PRIVATE KEY" not in str(info.value.details())


@pytest.mark.parametrize(("service", "path"), [("planner", "deploy/planner.toml"),
                                               ("executor", "deploy/executor.toml")])
def test_shipped_config_files_are_valid(service: str, path: str) -> None:
    """The sample TOML files in deploy/ hold only known settings of the right types."""
    import argparse  # noqa: PLC0415

    from common.config import resolve  # noqa: PLC0415
    from executor import config as executor_config  # noqa: PLC0415
    from planner import config as planner_config  # noqa: PLC0415

    module = planner_config if service == "planner" else executor_config
    options = module.OPTIONS if service == "planner" else (*module.CONNECTION, *module.RUN)
    resolved = resolve(options, argparse.Namespace(config=str(ROOT / path)), module.ENV_PREFIX, environ={})
    assert all(source == str(ROOT / path) for key, source in resolved.sources.items()
               if resolved.values[key] != next(o.default for o in options if o.key == key))


def test_full_run_logs_never_contain_the_token_secret_or_password(fakepve: Any, fakepve_cafile: str,
                                                                  planner: server.Running, tmp_path: Path) -> None:
    """Every log line of a token run and of a password run (with failures and retries) is free of secrets."""
    fakepve.apitokens["reconcile@pve!executor"] = "tok-8d1e-SECRET"
    fakepve.users["ops@pve"] = "pw-77c2-SECRET"
    vm = fakepve.add_vm(100, "web", status="stopped")
    vm.start_error = "could not start: storage offline"  # a failure path, logged with its error
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - vmid: 100\n    state: running\n    config: {onboot: 1}\n")
    (tmp_path / "token").write_text("tok-8d1e-SECRET\n")
    base = ["executor", "run", "--once", "--node", "pve1", "--pve-url", f"https://127.0.0.1:{fakepve.port}",
            "--pve-ca-file", fakepve_cafile, "--planner", f"127.0.0.1:{planner.port}", "--desired", str(desired),
            "--log-format", "json"]
    token = run(*base, "--pve-token-id", "reconcile@pve!executor", "--pve-token-file", str(tmp_path / "token"),
                "--state-dir", str(tmp_path / "a"))
    password = run(*base, "--pve-user", "ops@pve", "--state-dir", str(tmp_path / "b"),
                   env={"PVE_EXECUTOR_PVE_PASSWORD": "pw-77c2-SECRET"})
    for result in (token, password):
        assert result.returncode == 1  # the start failed, as arranged
        assert '"event": "action"' in result.stderr
        assert "SECRET" not in result.stderr + result.stdout


def test_executor_api_over_mutual_tls(fakepve: Any, make_engine: Any, pki: Pki) -> None:
    """The executor API served with TLS and required client certificates answers only trusted clients."""
    from executor.server import start_api  # noqa: PLC0415
    from executor.v1 import executor_pb2 as epb  # noqa: PLC0415
    from executor.v1 import executor_pb2_grpc as epb_grpc  # noqa: PLC0415

    engine = make_engine([])
    api = start_api(engine, "127.0.0.1:0", tls=ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca))
    try:
        trusted = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes(), Path(pki.client_key).read_bytes(),
                                               Path(pki.client_cert).read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{api.port}", trusted) as channel:
            assert epb_grpc.ExecutorServiceStub(channel).GetStatus(epb.GetStatusRequest(), timeout=5).journal_enabled
        anonymous = grpc.ssl_channel_credentials(Path(pki.ca).read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{api.port}", anonymous) as channel, pytest.raises(grpc.RpcError):
            epb_grpc.ExecutorServiceStub(channel).Reconcile(epb.ReconcileRequest(), timeout=3)
    finally:
        api.stop(0)


def test_plan_output_is_coloured_only_on_a_tty() -> None:
    """The dry run reads at a glance: key, current, desired; colour codes only when asked for."""
    from executor.actions import SET_CONFIG, Step  # noqa: PLC0415
    from executor.decisions import Admission, Judged  # noqa: PLC0415
    from executor.dryrun import DryRun, render  # noqa: PLC0415
    from executor.observe import Observed  # noqa: PLC0415
    from safety.classify import Class, Verdict  # noqa: PLC0415

    plan = pb.PlanResponse(actions=[pb.Action(vmid=100, type=pb.GUEST_TYPE_QEMU,
                                              set_config=pb.SetConfigAction(set={"memory": "4096"}))])
    step = Step(vmid=100, guest_type="qemu", kind=SET_CONFIG, set=(("memory", "4096"),))
    verdict = Verdict(cls=Class.BENIGN, op_kind="config", rule="benign_key", reasons=())
    result = DryRun(plan, Admission(admitted={}, judged=(Judged(step=step, verdict=verdict),)),
                    Observed(guests={}, configs={100: ({"memory": "2048"}, "")}, elsewhere=frozenset()))
    plain = render(result, color=False)
    assert plain == "guest 100: set config [benign]\n    memory: '2048' -> '4096'"
    assert "\033[32m'4096'\033[0m" in render(result, color=True)
