"""``docker run`` of this project's image, emulated for a host root (no container engine here).

What the image is comes from the Dockerfile: its ``USER`` uid:gid, its ``ENV``, its ``CMD``, its user
and group (``pve-reconcile``, in the container's own /etc/passwd and /etc/group) and the directories it
makes (/var/lib/pve-reconcile, /run/pve-reconcile). What a run adds comes from its flags: ``--group-add``
(supplementary gids), ``--env-file`` (read by the engine, as root), ``-e``, ``-v`` and the command.
The container's file system is a fresh root: the package's commands, the image's account files and
directories, and a copy of each bind mount (owners and modes kept) at its container path; a named
volume is an empty directory the image's user owns. The network flags (``-p``, ``--network``) are the
engine's business: the caller picks the addresses. ``docker exec`` is not emulated.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests import unitrun
from tests.executor_helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"
VALUED = frozenset({"--name", "-p", "--network", "--group-add", "-v", "--env-file", "-e"})
SWITCHES = frozenset({"-d"})
# docker, as far as the documented commands use it: each call's words recorded, for the test to emulate.
RECORDER = """#!/bin/sh
n=$(ls {calls} | wc -l)
printf '%s\\0' "$@" > "{calls}/$n"
"""


@dataclass(frozen=True, slots=True)
class Image:
    """What the Dockerfile's final stage sets."""

    uid: int
    gid: int
    env: dict[str, str]
    command: tuple[str, ...]

    @classmethod
    def read(cls) -> Image:
        """The image the Dockerfile builds."""
        text = DOCKERFILE.read_text()
        user = re.search(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
        command = re.search(r"^CMD (\[.*\])$", text, re.MULTILINE)
        assert user is not None and command is not None
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("ENV "))
        block = [lines[at].removeprefix("ENV ")]
        while block[-1].endswith("\\"):
            at += 1
            block.append(lines[at])
        env = dict(word.split("=", 1) for word in shlex.split(" ".join(line.rstrip("\\") for line in block)))
        env["PATH"] = env["PATH"].replace("$PATH", "/usr/local/bin:/usr/bin:/bin")  # python:3.11-slim's
        return cls(int(user[1]), int(user[2]), env, tuple(json.loads(command[1])))


@dataclass(frozen=True, slots=True)
class Run:
    """One ``docker run``'s flags, image and command."""

    options: tuple[tuple[str, str], ...]
    image: str
    command: tuple[str, ...]

    @classmethod
    def parse(cls, words: list[str]) -> Run:
        """``run [FLAGS] IMAGE [COMMAND...]`` (the words after ``docker``); an unknown flag fails the test."""
        assert words[0] == "run", words
        options, at = [], 1
        while words[at].startswith("-"):
            flag = words[at]
            assert flag in VALUED | SWITCHES, f"docker run {flag}: not emulated"
            if flag in VALUED:
                options.append((flag, words[at + 1]))
                at += 2
            else:
                at += 1
        return cls(tuple(options), words[at], tuple(words[at + 1:]))

    def all(self, flag: str) -> list[str]:
        """Every value of ``flag``."""
        return [value for key, value in self.options if key == flag]


def recorded(calls: Path) -> list[list[str]]:
    """The recorder's calls, in order."""
    return [path.read_text().split("\0")[:-1] for path in sorted(calls.iterdir(), key=lambda p: int(p.name))]


def _copy(source: Path, target: Path) -> None:
    """``source`` (a file or a tree) at ``target`` with its owners and modes: what a bind mount shows."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in source.iterdir():
            _copy(child, target / child.name)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    info = source.stat()
    os.chown(target, info.st_uid, info.st_gid)
    target.chmod(info.st_mode & 0o7777)


def container_root(host: Path, into: Path, image: Image, run: Run) -> tuple[str, ...]:
    """The container's file system in ``into``; the paths it may write (named volumes, the image's run dir)."""
    for command in unitrun.ENTRY_POINTS:
        unitrun.console_script(into, command)
    (into / "etc").mkdir(parents=True, exist_ok=True)
    (into / "etc/group").write_text(f"root:x:0:\npve-reconcile:x:{image.gid}:\n")
    (into / "etc/passwd").write_text(f"root:x:0:0:root:/root:/bin/sh\n"
                                     f"pve-reconcile:x:{image.uid}:{image.gid}::/nonexistent:/usr/sbin/nologin\n")
    writable = []
    for folder, mode in (("var/lib/pve-reconcile", 0o755), ("run/pve-reconcile", 0o750)):  # the Dockerfile's
        (into / folder).mkdir(parents=True, exist_ok=True)
        os.chown(into / folder, image.uid, image.gid)
        (into / folder).chmod(mode)
        writable.append("/" + folder)
    for volume in run.all("-v"):
        source, target, *_ = volume.split(":")
        if source.startswith("/"):
            assert (host / source.lstrip("/")).exists(), f"-v {volume}: the host has no {source}"
            _copy(host / source.lstrip("/"), into / target.lstrip("/"))
        else:  # a named volume, first used: the image's directory (its user's)
            assert target in writable, f"-v {volume}: the image makes no {target}"
    return tuple(writable)


def environment(host: Path, image: Image, run: Run) -> dict[str, str]:
    """The image's ENV, then each --env-file (the engine reads it on the host, as root), then each -e."""
    env = dict(image.env)
    for name in run.all("--env-file"):
        for line in (host / name.lstrip("/")).read_text().splitlines():
            if line and not line.startswith("#"):
                key, value = line.split("=", 1)
                env[key] = value
    for assignment in run.all("-e"):
        key, value = assignment.split("=", 1)
        env[key] = value
    return env


def start(host: Path, into: Path, run: Run, *, env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
          stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``run`` started in ``into`` (made from ``host``) as the image's user; ``env`` adds the caller's addresses."""
    image = Image.read()
    writable = container_root(host, into, image, run)
    groups = (image.gid, *(int(gid) for gid in run.all("--group-add")))
    who = unitrun.Identity(image.uid, image.gid, groups, home="/nonexistent", name="pve-reconcile")
    command = list(run.command or image.command)
    return unitrun.run_as(into, who, [*command, *extra], {**environment(host, image, run), **(env or {})},
                          writable, stdout)
