"""Starting one agent process: its own session, cgroup, user, death signal, rlimits.

No Python code runs between fork and exec: with a `preexec_fn`, subprocess
must fork() the whole daemon, which costs milliseconds on every restart;
without one it uses vfork. So each piece goes where it is cheapest —
`start_new_session` makes the agent lead its own process group (a stop
reaches whatever it forks), `prlimit` sets the rlimits on the new PID, and a
tiny exec trampoline does the rest before the agent's own program runs: it
writes its PID into the agent's cgroup.procs files, drops to the agent's user
and group, and arms PR_SET_PDEATHSIG (the kernel keeps it across the exec).
That is `agentd-pdeathsig`, compiled from pdeathsig.c when the package is
built (~0.15 ms), else util-linux's `setpriv` (~0.6 ms) behind a `sh -c` that
writes the cgroup.procs files. The guard process covers the daemon dying even
where neither exists.
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
from typing import TYPE_CHECKING

from agentd.bus.endpoint import parse_endpoint

from .spec import AgentSpec, Limits

if TYPE_CHECKING:
    from .cgroup import Group

PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

_HELPER = Path(__file__).with_name("agentd-pdeathsig")
_HAVE_HELPER = os.access(_HELPER, os.X_OK)
_SETPRIV = shutil.which("setpriv")


# The setpriv fallback's first step: `sh -c` writes its own PID ($$, the agent's after the
# execs) into each cgroup.procs, then execs the rest. The files come as arguments.
_JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 127; shift; '
    'n=$((n - 1)); done; exec "$@"'
)


def exec_prefix(
    death_signal: bool, creds: Credentials, group: Group | None = None, pid_fd: int = -1
) -> tuple[tuple[str, ...], bool]:
    """The argv before the agent's program, and whether it drops privileges itself.

    The trampoline runs as root, so it can join the agent's cgroup (root-owned
    files) before it drops to the agent's user; when the prefix cannot drop
    privileges, Popen does it (and the prefix then runs as that user). The helper
    joins v1 hierarchies through `tasks` and has the agent born in its cgroup2
    directory (clone3, its PID back through `pid_fd`): no task migration there,
    which costs the kernel an RCU grace period. The `sh -c` fallback moves itself
    (cgroup.procs), grace period and all. The helper takes our PID and refuses to
    run the agent if its parent is no longer us (the daemon died between fork and
    prctl); setpriv cannot check that.
    """
    switch = creds.uid is not None or creds.gid is not None
    if not (death_signal or group is not None or switch):
        return (), False
    if _HAVE_HELPER:
        prefix = [str(_HELPER), str(os.getpid()) if death_signal else "0"]
        if group is not None:
            prefix += [f"--cgroup={os.path.join(d, 'tasks')}" for d in group.v1_dirs()]
            if group.v2:
                prefix += [f"--clone-into={group.main}", f"--pid-fd={pid_fd}"]
        if creds.groups is not None:
            prefix.append("--groups=" + ",".join(str(g) for g in creds.groups))
        if creds.gid is not None:
            prefix.append(f"--gid={creds.gid}")
        if creds.uid is not None:
            prefix.append(f"--uid={creds.uid}")
        return (*prefix, "--"), True
    join: tuple[str, ...] = ()
    cgroup_procs = group.procs_files() if group is not None else []
    if cgroup_procs:
        join = ("/bin/sh", "-c", _JOIN_SCRIPT, "agentd-join", str(len(cgroup_procs)))
        join += tuple(cgroup_procs)
    if not _SETPRIV:
        if switch and cgroup_procs:
            raise OSError(
                errno.ENOEXEC,
                "no exec trampoline can join the cgroup and then drop privileges "
                "(build agentd-pdeathsig, or install util-linux's setpriv)",
            )
        return join, False
    setpriv = [_SETPRIV]
    if creds.uid is not None:
        setpriv.append(f"--reuid={creds.uid}")
    if creds.gid is not None:
        setpriv.append(f"--regid={creds.gid}")
    if creds.groups is not None:
        groups = ",".join(str(g) for g in creds.groups)
        setpriv.append(f"--groups={groups}" if groups else "--clear-groups")
    if death_signal:
        setpriv += ["--pdeathsig", "KILL"]
    if len(setpriv) == 1:
        return join, False
    return (*join, *setpriv, "--"), True


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
    group: Group | None = None,
) -> subprocess.Popen[bytes]:
    """Start the agent (exec); raises OSError (missing program, bad cwd, ...) on failure.

    `group`: the agent's cgroup, joined by the trampoline before the program runs.
    When the helper has the agent born there (clone3), the Popen's pid becomes the
    agent's: the trampoline that Popen started is gone by the time this returns.
    """
    env = agent_env(spec, incarnation, bus, keys_dir, state_dir)
    stderr = subprocess.STDOUT if spec.redirect_stderr else subprocess.PIPE
    popen = start_process(spec.argv, spec, env, death_signal, stderr=stderr, group=group)
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
    group: Group | None = None,
) -> subprocess.Popen[bytes]:
    """`argv` as `spec` says a process of it runs: its cwd, user, own session, death signal.

    An exec agent (in `group`, its cgroup), and a warm template (forkserver.py),
    whose forks inherit all of it but the cgroup (a forked agent joins its own).
    """
    creds = resolve_credentials(spec.user, spec.group)
    program = find_program(argv[0], env.get("PATH"), spec.cwd)
    ours = theirs = -1
    if _HAVE_HELPER and group is not None and group.v2:
        ours, theirs = os.pipe()
    prefix, drops = exec_prefix(death_signal, creds, group, theirs)
    if drops:
        creds = Credentials(None, None, None)
    try:
        popen = subprocess.Popen(
            (*prefix, program, *argv[1:]),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=spec.cwd,
            env=env,
            close_fds=True,
            pass_fds=(*pass_fds, theirs) if theirs >= 0 else pass_fds,
            start_new_session=theirs < 0,  # else the helper's setsid(), in the agent only
            user=creds.uid,
            group=creds.gid,
            extra_groups=creds.groups,
        )
    finally:
        if theirs >= 0:
            os.close(theirs)
    if ours >= 0:
        try:
            _take_over(popen, ours)
        finally:
            os.close(ours)
    return popen


def _take_over(popen: subprocess.Popen[bytes], pid_fd: int) -> None:
    """The helper cloned the agent as our child; the agent says its PID as it starts.

    Nothing said: the helper failed before the clone (its stderr says why) and is
    what the runtime watches exit. The helper's own PID: no clone3 here, it is the
    agent. Else the helper exits once the agent has exec'd, an orphan the daemon's
    reaper reaps (reaper.py).
    """
    text = b""
    while b"\n" not in text:
        chunk = os.read(pid_fd, 64)
        if not chunk:
            return
        text += chunk
    popen.pid = int(text)  # a child of ours too (CLONE_PARENT), as the runtime watches it


def find_program(program: str, path: str | None, cwd: str | None) -> str:
    """Resolve argv[0] here, so a typo is a clear error rather than the trampoline's exit 127.

    `agentd check` asks the same question (config.py), as systemd-analyze verify does.
    """
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
