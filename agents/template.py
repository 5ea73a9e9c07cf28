"""The warm template: imports an agent module once, then forks agents from it (SPEC §12).

    python -m agentd.agents.template pkg.mod:Class FD

The daemon starts one template per distinct template key (interpreter, module,
env, cwd, user) with one end of a SOCK_SEQPACKET socketpair as FD. The
template imports the SDK and the module, warms what asyncio and pyzmq load
lazily, runs `gc.freeze()` (so the forked agents' reference counting does not
copy the shared heap's pages), says `Hello` (or `Hello(error=traceback)` and
exits, if the module failed to import) and then serves `ForkRequest`s, one at
a time.

Each request is a double fork. The intermediate child exits at once, so the
agent is reparented to the nearest subreaper: the daemon. The agent first
makes its own session (its pid is its process group, as for an exec agent),
then reports `Forked(pid)` — only then may the daemon signal the group — and
waits until its parent is the daemon to arm PR_SET_PDEATHSIG (checking the
parent again after, to close the race with a daemon that just died). It then
takes the passed stdout/stderr, its environment, its limits, and runs the SDK
(`sdk.run_class`) in-process: its own ZeroMQ context and event loop, made
after the fork. The template stays single-threaded with no ZeroMQ context and
no running event loop, so no agent inherits a thread or a socket.

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
import time
import traceback
from typing import NoReturn

import msgspec

PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 1 << 20  # a request carries the agent's whole environment
REPARENT_TIMEOUT = 5.0  # seconds the agent waits to become the daemon's child


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
    nofile: int = 0  # RLIMIT_NOFILE (0: unchanged)
    cpu_seconds: int = 0  # RLIMIT_CPU (0: unchanged)
    # Files to write the agent's pid into before any agent code runs: where a
    # cgroup placement goes (cgroup.procs). The daemon passes none for now.
    cgroup_procs: list[str] = []


class Forked(msgspec.Struct, frozen=True, tag="forked"):
    """Template (or the agent itself) → daemon: the agent's pid, or why there is none."""

    name: str
    pid: int = 0
    error: str | None = None


Message = Hello | ForkRequest | Forked
_encoder = msgspec.json.Encoder()
decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


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
        name = "?"
        try:
            request = decoder.decode(data)
            if not isinstance(request, ForkRequest) or len(fds) != 2:
                raise ValueError("expected a fork request with two fds")
            name = request.name
            _fork(sock, request, fds, cls)
        except Exception as exc:
            sock.send(encode(Forked(name, error=f"{type(exc).__name__}: {exc}")))
        finally:
            for passed in fds:
                os.close(passed)


def _fork(sock: socket.socket, request: ForkRequest, fds: list[int], cls: type) -> None:
    """Double fork: the intermediate exits at once, the agent is the daemon's to reap."""
    sys.stdout.flush()
    sys.stderr.flush()
    intermediate = os.fork()
    if intermediate:
        os.waitpid(intermediate, 0)
        return
    intermediate = os.getpid()
    try:
        if os.fork():
            os._exit(0)
    except BaseException as exc:
        _refuse(sock, request, exc)
    try:
        _agent(sock, request, fds, cls, intermediate)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    os._exit(1)


def _refuse(sock: socket.socket, request: ForkRequest, exc: BaseException) -> NoReturn:
    """No agent after all: say why (the daemon is waiting for a pid), and go."""
    with contextlib.suppress(OSError):
        sock.send(encode(Forked(request.name, error=f"{type(exc).__name__}: {exc}")))
    os._exit(1)


# --- the agent, just after the fork --------------------------------------------------


def _agent(
    sock: socket.socket, request: ForkRequest, fds: list[int], cls: type, intermediate: int
) -> None:
    """Become an agent like an exec one: own session, daemon's child, own fds, SDK."""
    try:
        os.setsid()  # before the pid is reported: the daemon signals it as a group
        for path in request.cgroup_procs:  # before any agent code runs
            with open(path, "w") as f:
                f.write(str(os.getpid()))
    except OSError as exc:
        _refuse(sock, request, exc)
    sock.send(encode(Forked(request.name, pid=os.getpid())))
    sock.close()
    _become_daemon_child(intermediate, request.daemon_pid, request.death_signal)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for passed in fds:
        os.close(passed)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
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


def _become_daemon_child(intermediate: int, daemon_pid: int, death_signal: bool) -> None:
    """Wait for the reparenting, then arm the death signal; exit if the daemon is gone."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() == intermediate:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.0002)
    if os.getppid() != daemon_pid:  # adopted by someone else: the daemon is gone
        os._exit(1)
    if not death_signal:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != daemon_pid:  # the daemon died before prctl: no signal will come
        os._exit(1)


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
