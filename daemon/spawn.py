"""Starting one agent process: its own process group, death signal, user, rlimits.

Everything that must happen between fork and exec lives in `_child_setup`,
in an order that matters: new session (the agent leads its own process
group, so a stop reaches whatever it forks), supplementary groups, gid, uid,
and only then PR_SET_PDEATHSIG — the kernel clears the death signal when
credentials change, so setting it last is what makes it stick.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import resource
import signal
import subprocess
from dataclasses import dataclass

from .spec import AgentSpec, Limits

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def set_child_subreaper() -> None:
    """Make orphaned descendants of agents our children, so we can reap them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass(frozen=True)
class Credentials:
    uid: int | None
    gid: int | None
    user: str | None


def resolve_credentials(user: str | None, group: str | None) -> Credentials:
    """Look up uid/gid in the parent: doing it after fork is not safe."""
    uid = gid = None
    name = None
    if user is not None:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    return Credentials(uid, gid, name)


def _child_setup(creds: Credentials, limits: Limits, parent: int) -> None:
    """Runs in the child between fork and exec."""
    os.setsid()
    if creds.gid is not None:
        if creds.user is not None:
            os.initgroups(creds.user, creds.gid)
        else:
            os.setgroups([])
        os.setgid(creds.gid)
    if creds.uid is not None:
        os.setuid(creds.uid)
    if limits.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile, limits.nofile))
    if limits.cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(127)  # the daemon died before the death signal was armed


def agent_env(spec: AgentSpec, incarnation: int, bus: str) -> dict[str, str]:
    """The agent's environment: the daemon's, the contract's AGENTD_*, then its own."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    env.update(
        AGENTD_NAME=spec.name,
        AGENTD_INCARNATION=str(incarnation),
        AGENTD_BUS=bus,
        AGENTD_HEARTBEAT=repr(spec.heartbeat),
        PYTHONUNBUFFERED="1",
    )
    if spec.pool is not None:
        env["AGENTD_POOL"] = spec.pool
    env.update(dict(spec.env))
    return env


def spawn(spec: AgentSpec, incarnation: int, bus: str) -> subprocess.Popen[bytes]:
    """Start the agent; raises OSError (missing program, bad cwd, ...) on failure."""
    creds = resolve_credentials(spec.user, spec.group)
    parent = os.getpid()
    return subprocess.Popen(
        spec.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=spec.cwd,
        env=agent_env(spec, incarnation, bus),
        close_fds=True,
        preexec_fn=lambda: _child_setup(creds, spec.limits, parent),
    )


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True
