"""A systemd service start, done as systemd does it, for an installed root (PID 1 here is not systemd).

From the unit file installed in ``root`` (by deploy/install.sh) and its drop-ins (``UNIT.d/*.conf``,
read after it in name order: list settings add up, an empty assignment empties the list, others take
the last value):
- ``User=``/``Group=`` resolved in the root's own /etc/passwd and /etc/group (systemd-sysusers wrote
  them), with the user's supplementary groups (systemd calls initgroups);
- ``LoadCredential=ID:PATH`` read as root and written to /run/credentials/UNIT/ID, 0400 and owned by
  the service's uid in a 0500 directory it owns (systemd's way where the file system has no ACLs);
- ``StateDirectory=``/``RuntimeDirectory=`` made with their modes, owned by the user and group (one there
  already that another owns, say root's from a run by hand, is handed over with all it holds, as systemd does);
- ``Environment=`` plus what systemd adds (PATH, HOME, USER, LOGNAME, SHELL, CREDENTIALS_DIRECTORY,
  STATE_DIRECTORY, RUNTIME_DIRECTORY), ``UMask=``;
- ``ExecStart=`` with ``%d`` expanded, started by root in a private mount namespace, chrooted into the
  root, as the service's uid, gid and groups: the whole root read-only (``ProtectSystem=strict``) but
  the state and runtime directories, a fresh /tmp (``PrivateTmp=``). The host's /usr (but /usr/local,
  where install.sh writes), the Python and
  the code under test are bound in read-only at their own paths; the package's console script
  (``/opt/pve-reconcile/bin/pve-executor``, which pip makes) is written as pip would write it;
- ``ExecReload=`` (``systemctl reload``) with ``$MAINPID`` expanded, run in the same sandbox as the service.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.executor_helpers import ROOT as CODE

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd 252's default for services
ENTRY_POINTS = {"pve-executor": "executor.cli", "pve-planner": "planner.cli", "pve-healthcheck": "common.healthcheck"}
# Started as root: make a private mount namespace, bind what the service needs, drop to its ids, exec.
LAUNCH = r"""
set -eu
R=$1 IDS=$2 GIDS=$3 RW=$4 BINDS=$5
shift 5
mount --bind "$R" "$R" && mount -o remount,bind,ro "$R"
mount --rbind /dev "$R/dev" && mount --rbind /proc "$R/proc"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
for path in $BINDS; do  # a path under /tmp (the code's checkout) needs its mount point in the new /tmp
    [ -d "$R$path" ] || mkdir -p "$R$path"
    mount --bind -o ro "$path" "$R$path"
done
for path in $RW; do mount --bind "$R$path" "$R$path" && mount -o remount,bind,rw "$R$path"; done
umask "$UMASK"
unset UMASK
exec /usr/sbin/chroot --userspec="$IDS" --groups="$GIDS" "$R" "$@"
"""


@dataclass(frozen=True, slots=True)
class Identity:
    """The ids a service runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str = "/"
    shell: str = "/usr/sbin/nologin"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Unit:
    """The ``[Service]`` directives of an installed unit, in order (a key may repeat)."""

    name: str
    directives: tuple[tuple[str, str], ...]

    @classmethod
    def read(cls, root: Path, name: str) -> Unit:
        """The unit as installed in ``root``/etc/systemd/system, then its drop-ins in name order."""
        folder = root / "etc/systemd/system"
        found: list[tuple[str, str]] = []
        for path in (folder / name, *sorted((folder / f"{name}.d").glob("*.conf"))):
            section = ""
            for raw in path.read_text().splitlines():
                line = raw.strip()
                if line.startswith("["):
                    section = line
                elif line and not line.startswith("#") and section == "[Service]":
                    key, value = line.split("=", 1)
                    found.append((key, value))
        return cls(name, tuple(found))

    def all(self, key: str) -> list[str]:
        """Every value of ``key`` since its last empty assignment (systemd's reset of a list)."""
        values: list[str] = []
        for k, value in self.directives:
            if k == key:
                values = [*values, value] if value else []
        return values

    def one(self, key: str, default: str = "") -> str:
        """The last value of ``key`` (systemd's rule for single-valued settings)."""
        values = self.all(key)
        return values[-1] if values else default


def identity_of(root: Path, unit: Unit) -> Identity:
    """The unit's User=/Group= looked up in the root's own account files, as systemd would."""
    users = {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}
    groups = [line.split(":") for line in (root / "etc/group").read_text().splitlines()]
    user = users[unit.one("User")]
    gid = next(int(g[2]) for g in groups if g[0] == unit.one("Group", user[0]))
    extra = tuple(int(g[2]) for g in groups if user[0] in g[3].split(","))
    return Identity(int(user[2]), gid, (gid, *extra), home=user[5], shell=user[6], name=user[0])


def console_script(root: Path, command: str) -> None:
    """``/opt/pve-reconcile/bin/COMMAND`` as pip makes it, running the code under test with this Python."""
    path = root / "opt/pve-reconcile/bin" / command
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(CODE)!r})\n"
                    f"from {ENTRY_POINTS[command]} import main\nsys.exit(main())\n")
    path.chmod(0o755)


def _credentials(root: Path, unit: Unit, who: Identity) -> str:
    """Each LoadCredential= read as root into /run/credentials/UNIT, readable by the service's uid only."""
    directory = f"/run/credentials/{unit.name}"
    target = root / directory.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    for entry in unit.all("LoadCredential"):
        ident, source = entry.split(":", 1)
        data = (root / source.lstrip("/")).read_bytes()  # a missing source: systemd refuses to start
        path = target / ident
        path.write_bytes(data)
        path.chmod(0o400)
        os.chown(path, who.uid, who.gid)
    target.chmod(0o500)
    os.chown(target, who.uid, who.gid)
    return directory


def _directory(root: Path, kind: str, base: str, unit: Unit, who: Identity) -> str | None:
    name = unit.one(kind)
    if not name:
        return None
    path = root / base.lstrip("/") / name
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(int(unit.one(kind + "Mode", "0755"), 8))
    if (path.stat().st_uid, path.stat().st_gid) != (who.uid, who.gid):
        for below in path.rglob("*"):
            os.chown(below, who.uid, who.gid, follow_symlinks=False)
    os.chown(path, who.uid, who.gid)
    return f"{base}/{name}"


def environment(root: Path, unit: Unit, who: Identity) -> dict[str, str]:
    """The service's environment; makes its credentials, state and runtime directories on the way."""
    env = {"PATH": SYSTEMD_PATH, "HOME": who.home, "SHELL": who.shell, "USER": who.name, "LOGNAME": who.name,
           "CREDENTIALS_DIRECTORY": _credentials(root, unit, who)}
    for kind, base, variable in (("StateDirectory", "/var/lib", "STATE_DIRECTORY"),
                                 ("RuntimeDirectory", "/run", "RUNTIME_DIRECTORY")):
        made = _directory(root, kind, base, unit, who)
        if made:
            env[variable] = made
    for line in unit.all("Environment"):
        for assignment in shlex.split(line):
            key, value = assignment.split("=", 1)
            env[key] = value
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """``%d`` expanded, the one specifier the units use (systemd expands it in Exec*= and Environment=)."""
    expanded = text.replace("%d", env["CREDENTIALS_DIRECTORY"])
    assert "%" not in expanded, text  # a specifier this emulation does not know
    return expanded


def start(root: Path, name: str, *, who: Identity | None = None, extra: tuple[str, ...] = (),
          stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """Start the installed unit ``name`` as systemd would (``who`` replaces its User=/Group=); its stderr piped."""
    unit = Unit.read(root, name)
    who = who or identity_of(root, unit)
    env = environment(root, unit, who)
    env = {key: _expand(value, env) for key, value in env.items()}
    argv = shlex.split(_expand(unit.one("ExecStart"), env))
    writable = [env[v] for v in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY") if v in env]
    return _launch(root, who, writable, [*argv, *extra], {**env, "UMASK": unit.one("UMask", "0022")}, stdout)


def reload(root: Path, name: str, main: subprocess.Popen[str]) -> int:
    """``systemctl reload NAME``: ExecReload= with ``$MAINPID`` (``main``'s pid), as the service; its exit status."""
    unit = Unit.read(root, name)
    who = identity_of(root, unit)
    command = unit.one("ExecReload")
    assert command, f"{name} has no ExecReload=: systemctl reload fails"
    argv = shlex.split(command.replace("${MAINPID}", str(main.pid)).replace("$MAINPID", str(main.pid)))
    env = {"PATH": SYSTEMD_PATH, "MAINPID": str(main.pid), "UMASK": unit.one("UMask", "0022")}
    return _launch(root, who, [], argv, env, subprocess.DEVNULL).wait(timeout=30)


def run_as(root: Path, who: Identity, argv: list[str], env: dict[str, str], writable: tuple[str, ...] = (),
           stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    """``argv`` in the root's sandbox as ``who``, with exactly ``env`` (another runtime's start: a container's)."""
    return _launch(root, who, list(writable), argv, {**env, "UMASK": "0022"}, stdout)


def _launch(root: Path, who: Identity, writable: list[str], argv: list[str], env: dict[str, str],
            stdout: int | None) -> subprocess.Popen[str]:
    """``argv`` started in the root's sandbox as ``who`` (see LAUNCH); its stderr piped."""
    host = [f"/usr/{d}" for d in ("bin", "sbin", "lib", "lib64", "share") if Path("/usr", d).is_dir()]  # not local/
    binds = sorted({*host, sys.prefix, sys.base_prefix, str(CODE)})
    root.chmod(0o755)  # "/" to the service
    for path in ("dev", "proc", "tmp", *(b.lstrip("/") for b in binds)):
        (root / path).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        if Path("/" + link).is_symlink() and not (root / link).is_symlink():
            (root / link).symlink_to(os.readlink("/" + link))
    launch = ["unshare", "--mount", "--propagation", "private", "sh", "-c", LAUNCH, "launch", str(root),
              f"{who.uid}:{who.gid}", ",".join(map(str, who.groups)), " ".join(writable), " ".join(binds),
              *argv]
    return subprocess.Popen(launch, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
