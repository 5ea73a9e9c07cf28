"""Finding the config file and the daemon it names; the error every config problem becomes.

Split out of config.py so `agentd ctl` can locate the daemon's endpoints
without importing the whole validator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: `daemon.control` and `daemon.bus` unless the config says (SPEC §3).
CONTROL_DEFAULT = "ipc://{runtime_dir}/control.sock"
BUS_DEFAULT = "ipc://{runtime_dir}/bus.sock"


@dataclass(frozen=True)
class ConfigIssue:
    """One problem, located as precisely as the TOML text allows."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The config does not validate; `issues` says every reason found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def find_config(explicit: str | None = None) -> Path:
    """The config file by the contract's lookup order, or ConfigError."""
    candidates = [explicit] if explicit else []
    if not explicit:
        env = os.environ.get("AGENTD_CONFIG")
        candidates += [env] if env else []
        candidates += ["./agentd.toml", "/etc/agentd/agentd.toml"]
        for candidate in candidates:
            if Path(candidate).is_file():
                return Path(candidate)
        tried = ", ".join(candidates)
        raise ConfigError([ConfigIssue("agentd", None, f"no config file found (tried {tried})")])
    path = Path(explicit)
    if not path.is_file():
        raise ConfigError([ConfigIssue(str(path), None, "no such config file")])
    return path


def _systemd_directory(env: Mapping[str, str], name: str) -> str | None:
    """The first path of a systemd `*_DIRECTORY` variable (a colon-separated list)."""
    value = env.get(name)
    return value.split(":")[0] if value else None


def runtime_dir_default(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """Where the sockets are unless `daemon.runtime_dir` says (SPEC §3).

    `agentd ctl` computes this too, to find the daemon, so it must come out the
    same in the unit and in a root shell or under sudo: systemd's
    RuntimeDirectory= sets $RUNTIME_DIRECTORY (/run/agentd) for the daemon only,
    and root gets /run/agentd whatever its $XDG_RUNTIME_DIR (unset under sudo,
    /run/user/0 in a login session). Anyone else: $XDG_RUNTIME_DIR/agentd, else
    /tmp/agentd-$UID. `uid` is the effective uid (whose permissions count).
    """
    env = os.environ if environ is None else environ
    systemd = _systemd_directory(env, "RUNTIME_DIRECTORY")
    if systemd:
        return systemd
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return "/run/agentd"
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative one
        return f"{xdg}/agentd"
    return f"/tmp/agentd-{uid}"


def log_dir_default(runtime_dir: str, environ: Mapping[str, str] | None = None) -> str:
    """Where agent logs go unless `daemon.log_dir` says.

    Under systemd, $LOGS_DIRECTORY (LogsDirectory=, /var/log/agentd): systemd
    empties RuntimeDirectory= on every stop and restart, so logs kept there would
    lose the lines of the incarnation that crashed. Elsewhere <runtime_dir>/log.
    """
    env = os.environ if environ is None else environ
    return _systemd_directory(env, "LOGS_DIRECTORY") or f"{runtime_dir}/log"


def state_dir_default(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """Where durable state lives unless `daemon.state_dir` says (SPEC §10).

    systemd's StateDirectory= sets $STATE_DIRECTORY (a colon-separated list when the
    unit names several: ours is the first); outside systemd, /var/lib/agentd for
    root and the XDG state home for anyone else. `environ` and `uid` default to this
    process's: a test can ask about another user without becoming one.
    """
    env = os.environ if environ is None else environ
    systemd = _systemd_directory(env, "STATE_DIRECTORY")
    if systemd:
        return systemd
    if (os.getuid() if uid is None else uid) == 0:
        return "/var/lib/agentd"
    xdg = env.get("XDG_STATE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative one
        return f"{xdg}/agentd"
    home = env.get("HOME") or str(Path.home())
    return f"{home}/.local/state/agentd"


@dataclass(frozen=True)
class DaemonLocation:
    """Where the daemon a config names listens, `{runtime_dir}` substituted."""

    runtime_dir: str
    control: str
    bus: str
    keys_dir: str | None


def locate_daemon(config_path: Path, daemon: Mapping[str, Any]) -> DaemonLocation:
    """The runtime dir, endpoints and keys dir that a `[daemon]` table means.

    The daemon derives them here from its validated table (config.py) and
    `agentd ctl` from the raw one (it finds the daemon without validating the
    whole config), so the two cannot come out different. A relative runtime_dir
    is taken from the config file's directory.
    """
    runtime_dir = str(daemon.get("runtime_dir") or runtime_dir_default())
    if not os.path.isabs(runtime_dir):
        runtime_dir = str(config_path.resolve().parent / runtime_dir)

    def sub(value: Any) -> str:
        return str(value).replace("{runtime_dir}", runtime_dir)

    keys_dir = daemon.get("keys_dir")
    return DaemonLocation(
        runtime_dir=runtime_dir,
        control=sub(daemon.get("control", CONTROL_DEFAULT)),
        bus=sub(daemon.get("bus", BUS_DEFAULT)),
        keys_dir=sub(keys_dir) if keys_dir else None,
    )
