"""The desired-state file: a mistake named by file, line and field; values as PVE's text; a broken edit ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from executor.loop.desired import Declared, DesiredStateError, FileProvider, parse


@pytest.mark.parametrize(("text", "message"), [
    ("guests:\n  - vmid: 100\n    colour: blue\n", "f:3: colour: unknown key"),
    ("guests:\n  - vmid: 100\n    state: paused\n", "f:3: state: must be running or stopped"),
    ("guests:\n  - vmid: 100\n  - vmid: 100\n", "f:3: vmid: duplicate vmid 100 (first at line 2)"),
    ("guests:\n  - vmid: web\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - vmid: 1.5\n", "f:2: vmid: must be an integer"),
    ("guests:\n  - state: running\n", "f:2: vmid: required"),
    ("guests:\n  - vmid: 100\n    config: {Memory: 1}\n", "f:3: config.Memory: not a PVE config key"),
    ("guests:\n  - vmid: 100\n    config: [memory]\n", "f:3: config: must be a mapping"),
    ("hosts: []\n", "f:1: unknown key 'hosts'"),
    ("guests: [\n", "f:2: not valid YAML"),
])
def test_desired_file_errors_name_file_line_and_field(text: str, message: str) -> None:
    """Every mistake in the desired file is refused with where it is and what is wrong."""
    with pytest.raises(DesiredStateError) as info:
        parse(text, "f")
    assert str(info.value).startswith(message)


def test_desired_file_values_become_pve_text() -> None:
    """YAML booleans are written 1/0 (PVE refuses True), numbers as text, null as a delete."""
    (guest,) = parse("guests:\n  - vmid: 100\n    state: running\n    description: web tier\n"
                     "    config: {memory: 4096, onboot: true, agent: false, tags: ~}\n")
    assert guest == Declared(vmid=100, state="running", description="web tier",
                             config={"memory": "4096", "onboot": "1", "agent": "0", "tags": ""})
    assert parse("") == [] and parse("guests:\n") == []


def test_bad_reload_keeps_the_last_good_state(tmp_path: Path) -> None:
    """An edit that breaks the file is logged and ignored; fixing it is picked up."""
    path = tmp_path / "desired.yaml"
    path.write_text("guests:\n  - vmid: 100\n    state: running\n")
    provider = FileProvider(path)
    path.write_text("guests:\n  - vmid: 100\n    state: runing\n")
    with capture_logs() as logs:
        assert provider.desired() == [Declared(vmid=100, state="running")]
    assert logs[0]["event"] == "desired_reload_failed" and "runing" in logs[0]["error"]
    path.write_text("guests:\n  - vmid: 100\n    state: stopped\n    # now valid\n")
    assert provider.desired() == [Declared(vmid=100, state="stopped")]
