"""`pve-executor plan` as an operator and a script meet it: a real child process against fakepve and a planner.

Its exit code says what the plan holds (0 nothing, 3 changes, 4 an operator is needed, 2 a bad desired
file, each mistake with file:line, nothing planned); the last line sums the plan up; colour only on a
terminal without NO_COLOR; one reason per refused step; text and --json in the same words.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

from planner import server
from tests.executor_helpers import ROOT, cli

CLASSES = {"BENIGN", "APPROVAL", "DESTRUCTIVE"}
STEP_KEYS = {"vmid", "guest_type", "action", "class", "decision", "refusal", "why", "detail", "op_kind", "rule",
             "reasons", "changes"}


def _plan(fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path, desired: str,
          *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "desired.yaml"
    path.write_text("guests:\n" + desired)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return subprocess.run(cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}",
                              tmp_path, "plan", *extra, "--desired", str(path)),
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_exit_code_says_what_the_plan_holds(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                            tmp_path: Path) -> None:
    """0 the node matches; 3 `run` would change it; 4 a step waits for APPROVAL; the last line sums it up."""
    fakepve.add_vm(100, "web", status="running", config={"memory": 512})
    fakepve.add_vm(101, "guarded", status="stopped", config={"protection": 1})
    matches = _plan(fakepve, fakepve_cafile, planner, tmp_path, "  - {vmid: 100, state: running}\n")
    assert (matches.returncode, matches.stdout) == (
        0, "Plan: 0 to change, 0 needing APPROVAL, 0 refused for other reasons, "
           "0 skipped, 0 elsewhere. The node matches the desired state.\n")
    changes = _plan(fakepve, fakepve_cafile, planner, tmp_path, "  - {vmid: 100, config: {memory: 1024}}\n")
    assert changes.returncode == 3, changes.stderr
    assert changes.stdout.endswith("\nPlan: 1 to change, 0 needing APPROVAL, 0 refused for other reasons, "
                                   "0 skipped, 0 elsewhere.\n")
    held = _plan(fakepve, fakepve_cafile, planner, tmp_path,
                 "  - {vmid: 100, config: {memory: 1024}}\n  - {vmid: 101, config: {protection: 0}}\n"
                 "  - {vmid: 300, state: running}\n")
    assert held.returncode == 4, held.stderr
    assert held.stdout.endswith("\nPlan: 1 to change, 1 needing APPROVAL, 0 refused for other reasons, "
                                "1 skipped, 0 elsewhere.\n")
    assert "guest 101: set config [APPROVAL] REFUSED APPROVAL_REQUIRED: protection_off\n" in held.stdout
    assert "guest 300: SKIPPED NOT_FOUND\n" in held.stdout
    assert "\nSteps needing APPROVAL wait in the running daemon's `pve-executor pending`; " in held.stdout


def test_a_bad_desired_file_is_refused_whole_before_anything_is_planned(fakepve: Any, fakepve_cafile: str,
                                                                        planner: server.Running,
                                                                        tmp_path: Path) -> None:
    """Every mistake with file:line, exit 2, and not one request to Proxmox: nothing is planned."""
    before = len(fakepve.requests)
    bad = _plan(fakepve, fakepve_cafile, planner, tmp_path,
                "  - vmid: 100\n    config:\n      memroy: 1024\n      cores: 0\n      digest: abc\n")
    path = tmp_path / "desired.yaml"
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines()[:4] == [
        f"pve-executor: {path}:4: config.memroy: not a Proxmox config key; did you mean `memory`?",
        f"pve-executor: {path}:5: config.cores: must be at least 1, got 0",
        f"pve-executor: {path}:6: config.digest: reserved: a parameter of PVE's config write, not a config key "
        "(the executor conditions each write on the digest it read)",
        "pve-executor: 3 mistakes in the desired file; nothing planned"]
    assert len(fakepve.requests) == before


def test_a_key_of_the_other_guest_type_is_refused_before_the_planner_is_asked(
        fakepve: Any, fakepve_cafile: str, planner: server.Running, tmp_path: Path) -> None:
    """`agent` on a container: the node says it is one, and the file's line is named; exit 2, nothing written."""
    fakepve.add_ct(101, "cache", status="running", config={"memory": 512})
    before = len(fakepve.requests)
    bad = _plan(fakepve, fakepve_cafile, planner, tmp_path, "  - vmid: 101\n    config:\n      agent: 1\n")
    assert bad.returncode == 2, bad.stdout
    assert (f"pve-executor: {tmp_path / 'desired.yaml'}:4: config.agent: not a Proxmox config key of a lxc guest "
            "(guest 101 is lxc)") in bad.stderr
    assert not [r for r in fakepve.requests[before:] if r[0] in ("POST", "PUT") and "ticket" not in r[1]]


def _on_a_terminal(command: list[str], env: dict[str, str]) -> str:
    """What ``command`` writes to a terminal (its stdout a pseudo-terminal), as text."""
    main, child = pty.openpty()
    with subprocess.Popen(command, cwd=ROOT, stdout=child, stderr=subprocess.DEVNULL, env=env) as process:
        os.close(child)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        process.wait(timeout=60)
    os.close(main)
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(fakepve: Any, fakepve_cafile: str,
                                                           planner: server.Running, tmp_path: Path) -> None:
    """On a terminal the plan is coloured; NO_COLOR (any non-empty value) turns it off; a pipe never gets it."""
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512})
    desired = tmp_path / "desired.yaml"
    desired.write_text("guests:\n  - {vmid: 100, config: {memory: 1024}}\n")
    command = cli(f"https://127.0.0.1:{fakepve.port}", fakepve_cafile, f"127.0.0.1:{planner.port}", tmp_path,
                  "plan", "--desired", str(desired))
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    assert "\033[32m'1024'\033[0m" in _on_a_terminal(command, env)
    plain = _on_a_terminal(command, {**env, "NO_COLOR": "1"})
    assert "memory: '512' -> '1024'" in plain and "\033[" not in plain
    piped = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert "memory: '512' -> '1024'" in piped.stdout and "\033[" not in piped.stdout


def test_a_refused_step_gives_one_reason_and_each_key_its_own(fakepve: Any, fakepve_cafile: str,
                                                              planner: server.Running, tmp_path: Path) -> None:
    """Two keys needing approval in one step: one short head line; each key's reason on the key's line."""
    fakepve.add_vm(101, "guarded", status="stopped", config={"protection": 1, "net0": "virtio=BC:24:11:00:00:01,"
                                                                                      "bridge=vmbr0"})
    shown = _plan(fakepve, fakepve_cafile, planner, tmp_path, "  - vmid: 101\n    config: {protection: 0, "
                  "net0: 'virtio=BC:24:11:00:00:02,bridge=vmbr0', name: 'a, b'}\n")
    assert shown.returncode == 4, shown.stderr
    head, *keys = shown.stdout.split("\n\n")[0].splitlines()
    assert head.startswith("guest 101: set config [APPROVAL] REFUSED APPROVAL_REQUIRED: ") and "; " not in head
    assert keys[0] == "    name: 'guarded' -> 'a, b'"  # a benign key of the step: no reason of its own
    assert keys[1].startswith("    net0: 'virtio=BC:24:11:00:00:01,bridge=vmbr0' -> "
                              "'virtio=BC:24:11:00:00:02,bridge=vmbr0'  (")
    assert keys[2].startswith("    protection: '1' -> '0'  (write turns protection 1→0")


def test_json_speaks_the_words_of_the_text(fakepve: Any, fakepve_cafile: str, planner: server.Running,
                                          tmp_path: Path) -> None:
    """--json: documented keys; CHANGE/REFUSED, the classes, skip reasons and refusals as the text spells them;
    a delete's "to" is null where the text says <absent>; the summary and the exit code as the text's."""
    fakepve.add_node("pve2")
    fakepve.add_vm(100, "web", status="stopped", config={"memory": 512, "tags": "a"})
    fakepve.add_vm(101, "guarded", status="stopped", config={"protection": 1})
    fakepve.add_vm(201, "there", node="pve2", status="stopped")
    desired = ("  - {vmid: 100, state: running, config: {memory: 1024, tags: ~}}\n"
               "  - {vmid: 101, config: {protection: 0}}\n  - {vmid: 201, state: running}\n"
               "  - {vmid: 300, state: running}\n")
    text = _plan(fakepve, fakepve_cafile, planner, tmp_path, desired)
    shown = _plan(fakepve, fakepve_cafile, planner, tmp_path, desired, "--json")
    body = json.loads(shown.stdout)
    assert set(body) == {"steps", "pending", "skipped", "elsewhere", "staged", "summary", "exit_code"}
    assert all(set(step) == STEP_KEYS for step in body["steps"])
    assert [(s["vmid"], s["action"], s["class"], s["decision"], s["refusal"], s["why"]) for s in body["steps"]] == [
        (100, "set_config", "BENIGN", "CHANGE", None, None), (100, "start", "BENIGN", "CHANGE", None, None),
        (101, "set_config", "APPROVAL", "REFUSED", "APPROVAL_REQUIRED", "protection_off")]
    assert body["steps"][0]["changes"] == [{"key": "memory", "from": "512", "to": "1024"},
                                           {"key": "tags", "from": "a", "to": None}]
    assert "    tags: 'a' -> <absent>" in text.stdout
    assert [(s["vmid"], s["reason"]) for s in body["skipped"]] == [(300, "NOT_FOUND")]
    assert "guest 300: SKIPPED NOT_FOUND" in text.stdout
    assert body["elsewhere"] == [201]
    assert body["summary"] == {"change": 2, "approval": 1, "refused": 0, "deferred": 0, "skipped": 1, "elsewhere": 1,
                               "staged": 0}
    assert body["exit_code"] == shown.returncode == text.returncode == 4
    assert [(p["class"], p["refusal"]) for p in body["pending"]] == [("APPROVAL", "APPROVAL_REQUIRED")]
    lowered = {"approval", "benign", "destructive", "NEEDS_APPROVAL", "admitted", "<deleted>"}
    assert not [word for word in lowered if word in text.stdout.replace("APPROVAL_REQUIRED", "")]
