"""Starting one agent process: its own session, death signal, user, rlimits.

No Python code runs between fork and exec: with a `preexec_fn`, subprocess
must fork() the whole daemon, which costs milliseconds on every restart;
without one it uses vfork. So each piece goes where it is cheapest —
`start_new_session` makes the agent lead its own process group (a stop
reaches whatever it forks), Popen's own `user`/`group`/`extra_groups` drop
privileges, `prlimit` sets the limits on the new PID, and
PR_SET_PDEATHSIG comes from a tiny exec trampoline that sets it and execs the
agent (the kernel keeps it across that exec): `agentd-pdeathsig`, compiled
from pdeathsig.c when the package is built (~0.15 ms), else util-linux's
`setpriv --pdeathsig KILL` (~0.6 ms). The guard process covers the daemon
dying even where neither exists.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentd.bus.endpoint import parse_endpoint

from .spec import AgentSpec, Limits

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

_HELPER = Path(__file__).with_name("agentd-pdeathsig")
_HAVE_HELPER = os.access(_HELPER, os.X_OK)
_SETPRIV = shutil.which("setpriv")


def _everyone_can_run(path: Path) -> bool:
    """o+x on the file and every directory above it (a checkout under /root is not)."""
    try:
        return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))
    except OSError:
        return False


# An agent with `user` set has dropped privileges before the trampoline runs.
_HELPER_FOR_ANYONE = _HAVE_HELPER and _everyone_can_run(_HELPER)


def death_signal_prefix(other_user: bool = False) -> tuple[str, ...]:
    """argv prefix that arms PR_SET_PDEATHSIG=SIGKILL in the agent, then execs it.

    The helper takes our PID and refuses to run the agent if its parent is no
    longer us (the daemon died between fork and prctl); setpriv cannot check that.
    """
    if _HELPER_FOR_ANYONE if other_user else _HAVE_HELPER:
        return (str(_HELPER), str(os.getpid()))
    if _SETPRIV:
        return (_SETPRIV, "--pdeathsig", "KILL", "--")
    return ()


def set_child_subreaper() -> None:
    """Make orphaned descendants of agents our children, so we can reap them."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@dataclass(frozen=True)
class Credentials:
    uid: int | None
    gid: int | None
    groups: list[int] | None  # supplementary groups when switching user


def resolve_credentials(user: str | None, group: str | None) -> Credentials:
    """Look up uid/gid in the parent: doing it after fork is not safe."""
    uid = gid = None
    groups = None
    if user is not None:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    if group is not None:
        gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        groups = groups if groups is not None else []
    return Credentials(uid, gid, groups)


def _apply_limits(pid: int, limits: Limits) -> None:
    """rlimits on the new process (right after spawn, before it has done much)."""
    for what, value in (
        (resource.RLIMIT_NOFILE, limits.nofile),
        (resource.RLIMIT_CPU, limits.cpu_seconds),
    ):
        if value:
            resource.prlimit(pid, what, (value, value))


def agent_env(
    spec: AgentSpec,
    incarnation: int,
    bus: str,
    keys_dir: str | None = None,
    state_dir: str | None = None,
) -> dict[str, str]:
    """The agent's environment: the daemon's, the contract's AGENTD_*, then its own.

    AGENTD_KEYS_DIR is set only for a tcp bus: the CurveZMQ client keys to connect with.
    AGENTD_STATE_DIR is the daemon's state_dir: where an agent keeps what must outlive
    it (the hub's job store), next to the bus journal.
    """
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
    if spec.ack:
        env["AGENTD_ACK"] = "1"
    if keys_dir and parse_endpoint(bus).needs_keys:
        env["AGENTD_KEYS_DIR"] = keys_dir
    if state_dir:
        env["AGENTD_STATE_DIR"] = state_dir
    env.update(dict(spec.env))
    env.pop("AGENTD_ARGS", None)  # the contract's, never inherited or configured
    if spec.args is not None:  # a dynamic child's spawn args (daemon/dynamic.py)
        env["AGENTD_ARGS"] = spec.args
    return env


def spawn(
    spec: AgentSpec,
    incarnation: int,
    bus: str,
    death_signal: bool = True,
    keys_dir: str | None = None,
    state_dir: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start the agent (exec); raises OSError (missing program, bad cwd, ...) on failure."""
    env = agent_env(spec, incarnation, bus, keys_dir, state_dir)
    popen = start_process(spec.argv, spec, env, death_signal)
    try:
        _apply_limits(popen.pid, spec.limits)
    except OSError:
        popen.kill()
        popen.wait()
        raise
    return popen


def start_process(
    argv: tuple[str, ...],
    spec: AgentSpec,
    env: dict[str, str],
    death_signal: bool = True,
    pass_fds: tuple[int, ...] = (),
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """`argv` as `spec` says a process of it runs: its cwd, user, own session, death signal.

    An exec agent, and a warm template (forkserver.py), whose forks inherit all of it.
    """
    creds = resolve_credentials(spec.user, spec.group)
    program = _executable(argv[0], env.get("PATH"), spec.cwd)
    other_user = creds.uid is not None or creds.gid is not None
    return subprocess.Popen(
        (*(death_signal_prefix(other_user) if death_signal else ()), program, *argv[1:]),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=spec.cwd,
        env=env,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,
        user=creds.uid,
        group=creds.gid,
        extra_groups=creds.groups,
    )


def _executable(program: str, path: str | None, cwd: str | None) -> str:
    """Resolve argv[0] here, so a typo is a clear error rather than the trampoline's exit 127."""
    if os.sep in program:
        full = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        if not os.access(full, os.X_OK) or os.path.isdir(full):
            raise FileNotFoundError(errno.ENOENT, "no such executable", program)
        return full
    found = shutil.which(program, path=path)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "not found on PATH", program)
    return found


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True
