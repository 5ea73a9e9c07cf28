"""The warm template: imports an agent module once, then forks agents from it (SPEC §12).

    python -m agentd.agents.template pkg.mod:Class FD

The daemon starts one template per distinct template key (interpreter, module,
env, cwd, user) with one end of a SOCK_SEQPACKET socketpair as FD. The
template imports the SDK and the module, warms what asyncio and pyzmq load
lazily, runs `gc.freeze()` (so the forked agents' garbage collections do not
write to, and so copy, the shared heap's pages), says `Hello` (or `Hello(error=traceback)` and
exits, if the module failed to import) and then serves `ForkRequest`s in the
order they come (the daemon keeps several in flight).

Each request is one clone3(CLONE_PARENT): the agent is born the daemon's
child (the template's parent), so nothing has to reparent it, and with
CLONE_INTO_CGROUP it is born in its cgroup2 directory — no task migration,
which costs the kernel an RCU grace period (~10 ms) on every move. The agent
first makes its own session (its pid is its process group, as for an exec
agent), joins its v1 hierarchies (a hybrid host's memory and pids), then
reports `Forked(pid)` — only then may the daemon signal the group — and arms
PR_SET_PDEATHSIG (checking its parent again after, to close the race with a
daemon that just died). It then takes the passed stdout/stderr, its
environment, its limits, and runs the SDK (`sdk.run_class`) in-process: its own
ZeroMQ context and event loop, made after the fork. The template stays
single-threaded with no ZeroMQ context and no running event loop, so no agent
inherits a thread or a socket.

The clone is what os.fork does around fork(2) — PyOS_BeforeFork, the
syscall, PyOS_AfterFork_Child/Parent, all with the GIL held — plus what
glibc's fork does that a raw clone does not: the kernel writes the child's tid
into glibc's thread descriptor (CLONE_CHILD_SETTID at the address where it
keeps it, found once by looking for our tid there), so pthread functions in
the agent see its own tid. A libc where that cannot be found is a clear error
at the template's start (`start = "exec"` works everywhere).

This module must not import agentd.daemon (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import resource
import signal
import socket
import sys
import traceback
from typing import NoReturn

import msgspec

PR_SET_PDEATHSIG = 1
PR_SET_MEMORY_MERGE = 67  # Linux 6.4
MAX_MESSAGE = 1 << 20  # a request carries the agent's whole environment
SYS_CLONE3 = 435  # the same number on every architecture
CLONE_PARENT = 0x8000
CLONE_CHILD_SETTID = 0x01000000
CLONE_INTO_CGROUP = 0x200000000


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """Template → daemon once: ready to fork (error: the module's import traceback)."""

    pid: int
    error: str | None = None


class ForkRequest(msgspec.Struct, frozen=True, tag="fork"):
    """Daemon → template, with the agent's stdout and stderr fds (SCM_RIGHTS)."""

    name: str
    incarnation: int
    daemon_pid: int  # the subreaper the agent must end up a child of
    env: dict[str, str]  # the agent's whole environment, as an exec agent gets it
    death_signal: bool = True  # PR_SET_PDEATHSIG=SIGKILL once it is (daemon.death_signal)
    memory_ksm: bool = False  # PR_SET_MEMORY_MERGE: KSM may merge its pages (memory_ksm)
    nofile: int = 0  # RLIMIT_NOFILE (0: unchanged)
    cpu_seconds: int = 0  # RLIMIT_CPU (0: unchanged)
    # The agent's cgroup2 directory: it is born there (CLONE_INTO_CGROUP). "": none.
    cgroup_dir: str = ""
    # cgroup.procs files to write the agent's pid into before any agent code runs:
    # its v1 hierarchies (on a hybrid host, memory and pids), or all on a v1 host.
    cgroup_procs: list[str] = []


class Forked(msgspec.Struct, frozen=True, tag="forked"):
    """Template (or the agent itself) → daemon: the agent's pid, or why there is none.

    Requests are pipelined, and each agent answers for itself, so answers come in
    any order: (name, incarnation) says which request this one answers.
    """

    name: str
    pid: int = 0
    error: str | None = None
    incarnation: int = 0


Message = Hello | ForkRequest | Forked
_encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


# --- the clone -------------------------------------------------------------------------


class _CloneArgs(ctypes.Structure):
    """struct clone_args (linux/sched.h), up to `cgroup` (Linux 5.7)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


class Cloner:
    """clone3(CLONE_PARENT [| CLONE_INTO_CGROUP]) from Python, as os.fork forks."""

    def __init__(self) -> None:
        self.libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held
        self.libc.syscall.restype = ctypes.c_long
        self.libc.pthread_self.restype = ctypes.c_void_p
        self.tid_address = self._tid_address()

    def _tid_address(self) -> int:
        """Where glibc keeps this thread's tid (struct pthread), for CLONE_CHILD_SETTID."""
        base = self.libc.pthread_self()
        tid = self.libc.gettid() if hasattr(self.libc, "gettid") else -1
        raw = ctypes.string_at(base, 2048)
        hits = [i for i in range(0, len(raw), 4) if int.from_bytes(raw[i : i + 4], "little") == tid]
        if tid <= 0 or len(hits) != 1:
            raise RuntimeError(
                "cannot fork agents here (this libc's thread descriptor was not found): "
                'set start = "exec"'
            )
        return base + hits[0]

    def clone(self, cgroup_fd: int = -1) -> int:
        """The agent's pid in the template, 0 in the agent (the daemon's child); OSError."""
        args = _CloneArgs(flags=CLONE_PARENT | CLONE_CHILD_SETTID, child_tid=self.tid_address)
        if cgroup_fd >= 0:
            args.flags |= CLONE_INTO_CGROUP
            args.cgroup = cgroup_fd
        api = ctypes.pythonapi
        api.PyOS_BeforeFork()
        pid = self.libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        error = ctypes.get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(error, f"clone3: {os.strerror(error)}")
        return pid


# --- the template process --------------------------------------------------------------


def warm(target: str) -> type:
    """Import the SDK and the agent's module; touch what is otherwise loaded lazily."""
    import asyncio

    import zmq
    import zmq.asyncio

    from agentd.bus.envelope import encoder, peer_decoder
    from agentd.bus.log import configure

    from . import sdk

    configure("console")
    sys.path.insert(0, os.getcwd())
    cls = sdk.load(target)
    # msgspec keeps each Struct type's codec info on the class once a codec is built:
    # built here, it is shared; built in each agent, it is each agent's own memory.
    encoder()
    peer_decoder()
    # A throwaway loop pulls in the selector, the self-pipe and the runner's machinery;
    # closed again, so nothing is running (or has a thread) when we fork.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    asyncio.set_event_loop(None)
    zmq.zmq_version_info()
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:  # a fork copies only the forking thread: locks held elsewhere stay held
        raise RuntimeError(
            f"{target}: importing it started {threads - 1} thread(s); a template must stay "
            'single-threaded to fork safely: set start = "exec" for this agent'
        )
    return cls


def serve(target: str, fd: int) -> int:
    """The template's whole life: warm, say hello, fork on request until EOF."""
    sock = socket.socket(fileno=fd)
    try:
        cls = warm(target)
        cloner = Cloner()
    except BaseException:
        sock.send(encode(Hello(os.getpid(), error=traceback.format_exc())))
        return 1
    gc.freeze()
    sock.send(encode(Hello(os.getpid())))
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        except InterruptedError:
            continue
        if not data:
            return 0  # the daemon closed its end (or is gone)
        name, incarnation = "?", 0
        try:
            request = decoder.decode(data)
            if not isinstance(request, ForkRequest) or len(fds) != 2:
                raise ValueError("expected a fork request with two fds")
            name, incarnation = request.name, request.incarnation
            _fork(sock, request, fds, cls, cloner)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            sock.send(encode(Forked(name, error=error, incarnation=incarnation)))
        finally:
            for passed in fds:
                os.close(passed)


def _fork(
    sock: socket.socket, request: ForkRequest, fds: list[int], cls: type, cloner: Cloner
) -> None:
    """One clone: the agent is the daemon's child, in its cgroup2 directory if it has one."""
    sys.stdout.flush()
    sys.stderr.flush()
    cgroup_fd = -1
    if request.cgroup_dir:
        cgroup_fd = os.open(request.cgroup_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pid = cloner.clone(cgroup_fd)
    finally:
        if cgroup_fd >= 0:
            os.close(cgroup_fd)  # in the agent too (after the clone: it is born in it)
    if pid:
        return
    try:
        _agent(sock, request, fds, cls)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    os._exit(1)


def _refuse(sock: socket.socket, request: ForkRequest, exc: BaseException) -> NoReturn:
    """No agent after all: say why (the daemon is waiting for a pid), and go."""
    with contextlib.suppress(OSError):
        error = f"{type(exc).__name__}: {exc}"
        sock.send(encode(Forked(request.name, error=error, incarnation=request.incarnation)))
    os._exit(1)


# --- the agent, just after the fork --------------------------------------------------


def _agent(sock: socket.socket, request: ForkRequest, fds: list[int], cls: type) -> None:
    """Become an agent like an exec one: own session, daemon's child, own fds, SDK."""
    try:
        os.setsid()  # before the pid is reported: the daemon signals it as a group
        for path in request.cgroup_procs:  # before any agent code runs
            with open(path, "w") as f:
                f.write(str(os.getpid()))
    except OSError as exc:
        _refuse(sock, request, exc)
    sock.send(encode(Forked(request.name, pid=os.getpid(), incarnation=request.incarnation)))
    sock.close()
    _arm_death_signal(request.daemon_pid, request.death_signal)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for passed in fds:
        os.close(passed)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if request.memory_ksm:
        _merge_memory()
    _reset_signals()
    os.environ.clear()
    os.environ.update(request.env)
    for what, value in (
        (resource.RLIMIT_NOFILE, request.nofile),
        (resource.RLIMIT_CPU, request.cpu_seconds),
    ):
        if value:
            resource.setrlimit(what, (value, value))
    random.seed()  # os.register_at_fork does it already; an explicit one costs nothing
    from .sdk import run_class

    code = run_class(cls)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _arm_death_signal(daemon_pid: int, death_signal: bool) -> None:
    """PR_SET_PDEATHSIG=SIGKILL; exit if the daemon is gone (we were born its child)."""
    if os.getppid() != daemon_pid:  # adopted by someone else: the daemon is gone
        os._exit(1)
    if not death_signal:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != daemon_pid:  # the daemon died before prctl: no signal will come
        os._exit(1)


def _merge_memory() -> None:
    """Let KSM merge this agent's pages with identical ones (once ksmd is running).

    After a fork most of an agent's private memory is copy-on-write copies of the
    template's pages, written only to bump refcounts: the same bytes in every agent.
    A kernel without it (before 6.4) is not a reason to refuse the agent: it says so
    on stderr, and runs unmerged.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(
            f"agentd: memory_ksm: prctl(PR_SET_MEMORY_MERGE): {os.strerror(err)}", file=sys.stderr
        )


def _reset_signals() -> None:
    """What an exec agent starts with: nothing blocked, Python's default handlers."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or ":" not in argv[0] or not argv[1].isdigit():
        print("usage: python -m agentd.agents.template pkg.mod:Class FD", file=sys.stderr)
        return 2
    return serve(argv[0], int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
