"""Warm templates, the daemon's side: one per template key, supervised, forking on request.

A `start = "fork"` agent is forked from a template process (agents/template.py)
that has already imported the SDK and the agent's module. Two agents share a
template when nothing that matters before `setup()` differs between them: the
interpreter and module (the argv), the env, the cwd, the user and group —
`template_key`. Per-agent settings (name, incarnation, pool, ...) travel in
each request as the agent's whole environment, so a forked agent sees exactly
what an exec one would.

The template is started lazily, by the first fork that needs it, and is an
internal process: it is not in the user's tree nor in `status` (its stderr is
the daemon's). It is supervised here: if it dies it is started again (its
death kills no agent — they are born the daemon's children, each in its own
session); `retire` replaces it so new code runs (reload, `ctl restart`). A
module that fails to import fails the start with its traceback (`ForkError`),
and the next start tries a fresh template.

A template forks at most FORKS_PER_TEMPLATE agents. Its successor (same key) is
started half way there, and takes over warm; the used-up one exits, and its
agents live on. An agent's start, in the kernel, got dearer the more agents
shared the template's pages.

Reaping: a forked agent is born the daemon's child (clone3 with CLONE_PARENT),
before its pid has come back over the socket. Each fork in flight holds the
reaper (reaper.py), which leaves an unknown zombie alone meanwhile, so no
agent is ever reaped as an orphan.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from agentd.agents.template import (
    MAX_MESSAGE,
    Forked,
    ForkRequest,
    Hello,
    decoder,
    encode,
)
from agentd.bus.log import get_logger

from . import spawn
from .reaper import reaper
from .spec import AgentSpec, DaemonSpec

TemplateKey = tuple[object, ...]
#: Environment variables that differ between agents of one template: not in its env.
PER_AGENT = ("AGENTD_NAME", "AGENTD_INCARNATION", "AGENTD_POOL", "AGENTD_ACK", "AGENTD_HEARTBEAT")
FORK_TIMEOUT = 5.0  # seconds for a warm template to answer a fork request
HELLO_TIMEOUT = 10.0  # seconds, at least, for a template to import the module
RESTART_DELAY = 1.0  # before a template that died on its own is started again
RETIRE_GRACE = 5.0  # a retired template has this long to exit on EOF before SIGKILL
IN_FLIGHT = 32  # fork requests one template may have at once (each answered on its own)
# Agents one template forks before a fresh one takes over (warmed from half way). An
# agent's start got dearer the more agents shared its template's pages: 5.5 ms of CPU
# with 100 of them, 19 ms with 1,000, the same 1,300 page faults each (bench/scale.py).
FORKS_PER_TEMPLATE = 256


class ForkError(Exception):
    """The fork did not happen; the message (a traceback, maybe) is the stderr tail."""


class _Retired(ForkError):
    """The template was retired (a reload, `ctl restart`) before it said hello."""


class GroupGuard(Protocol):
    """The guard (runtime.Guard): told about each process group we create."""

    def add(self, pgid: int) -> None: ...
    def remove(self, pgid: int) -> None: ...


def template_key(spec: AgentSpec) -> TemplateKey:
    """What makes two agents' processes differ before setup(): they share a template if equal."""
    return (spec.argv, spec.env, spec.cwd, spec.user, spec.group)


@dataclass(eq=False)
class Template:
    """One template process and the daemon's end of its socket.

    Requests are pipelined, up to IN_FLIGHT at once: the template only clones
    (~1.5 ms) and reads the next, while each agent answers for itself once it has
    its own session. A reader on the socket hands each answer to the request it
    answers; EOF fails every request still waiting. A retired template is closed
    once no request is waiting.
    """

    key: TemplateKey
    spec: AgentSpec  # the first agent spec that needed it (to start it again)
    popen: subprocess.Popen[bytes]
    sock: socket.socket
    hello: asyncio.Future[Hello]
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(IN_FLIGHT))
    answers: dict[tuple[str, int], asyncio.Future[Forked]] = field(default_factory=dict)
    retired: bool = False  # no new request: closed once none is waiting
    closed: bool = False
    forks: int = 0  # requests sent to it
    successor: Template | None = None  # started half way to FORKS_PER_TEMPLATE

    @property
    def pid(self) -> int:
        return self.popen.pid


class ForkServer:
    """The daemon's templates, by key."""

    def __init__(
        self,
        daemon: DaemonSpec,
        guard: GroupGuard | None,
        wanted: Callable[[TemplateKey], AgentSpec | None],
    ) -> None:
        self.daemon = daemon
        self.guard = guard
        self.wanted = wanted  # an agent spec that still needs this key, if any
        self.templates: dict[TemplateKey, Template] = {}
        self.log = get_logger("agentd.forkserver")
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def fork(
        self,
        spec: AgentSpec,
        incarnation: int,
        env: dict[str, str],
        stdout: int,
        stderr: int,
        cgroup_dir: str = "",
        cgroup_procs: list[str] | None = None,
    ) -> int:
        """Fork `spec` from its template with these stdout/stderr; the agent's pid.

        `cgroup_dir`: the agent's cgroup2 directory (SPEC §11), which it is born in;
        `cgroup_procs`: the cgroup.procs files of its v1 hierarchies, which it writes
        its pid into before any agent code runs.
        """
        request = ForkRequest(
            name=spec.name,
            incarnation=incarnation,
            daemon_pid=os.getpid(),
            death_signal=self.daemon.death_signal,
            env=env,
            memory_ksm=spec.memory_ksm,
            nofile=spec.limits.nofile,
            cpu_seconds=spec.limits.cpu_seconds,
            cgroup_dir=cgroup_dir,
            cgroup_procs=cgroup_procs or [],
        )
        with reaper.hold():  # the agent is our child before its pid is back
            for _ in range(3):  # a template retired while we queued: take the fresh one
                template = self._template(spec)
                try:
                    await self._greeted(template, max(spec.heartbeat, HELLO_TIMEOUT))
                except _Retired:
                    continue
                async with template.slots:
                    if template.retired:
                        continue
                    self._count(template, spec)
                    return await self._ask(template, request, stdout, stderr)
            raise ForkError("no template stayed up long enough to fork")

    async def _greeted(self, template: Template, timeout: float) -> None:
        """The template's hello: it imported the module, or why not."""
        try:
            hello = await asyncio.wait_for(asyncio.shield(template.hello), timeout)
        except TimeoutError:
            self.retire_template(template)
            raise ForkError(
                f"the template did not import {template.spec.module} in {timeout}s"
            ) from None
        if hello.error is not None:
            self.retire_template(template)  # the next start tries a fresh import
            raise ForkError(hello.error.rstrip())

    async def _ask(self, template: Template, request: ForkRequest, stdout: int, stderr: int) -> int:
        """One request; its answer (from the agent itself, or the template): the pid."""
        key = (request.name, request.incarnation)
        answer = template.answers[key] = self.loop.create_future()
        try:
            await self._send(template, encode(request), [stdout, stderr])
            message = await asyncio.wait_for(answer, FORK_TIMEOUT)
        except TimeoutError:
            self.retire_template(template)
            raise ForkError(f"the template did not fork in {FORK_TIMEOUT}s") from None
        except OSError as exc:
            raise ForkError(f"the template exited ({exc})") from None
        finally:
            if template.answers.get(key) is answer:
                del template.answers[key]
            if template.retired and not template.answers:
                self._close(template)
        if message.error is not None:
            raise ForkError(f"fork failed: {message.error}")
        return message.pid

    async def _send(self, template: Template, data: bytes, fds: list[int]) -> None:
        """send_fds on the non-blocking socket, waiting for room when it is full."""
        while True:
            try:
                socket.send_fds(template.sock, [data], fds)
                return
            except BlockingIOError:
                room = self.loop.create_future()
                self.loop.add_writer(template.sock, room.set_result, None)
                try:
                    await room
                finally:
                    self.loop.remove_writer(template.sock)

    def _readable(self, template: Template) -> None:
        """Every message waiting on the socket to its request; EOF or garbage fails them all."""
        while True:
            try:
                data = template.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""  # as EOF: it is gone
            message = _decode(data)
            if isinstance(message, Hello) and not template.hello.done():
                template.hello.set_result(message)
                continue
            waiting = None
            if isinstance(message, Forked):
                waiting = template.answers.pop((message.name, message.incarnation), None)
            if waiting is not None:
                if not waiting.done():
                    waiting.set_result(message)
                continue
            self._broken(template, f"the template exited during the fork ({message})")
            return

    def _broken(self, template: Template, why: str) -> None:
        """EOF or a message no request waits for: fail every waiting request, close it."""
        self.loop.remove_reader(template.sock)
        error = ForkError(why)
        _fail(template.hello, ForkError(f"the template exited before it was ready ({why})"))
        for waiting in template.answers.values():
            if not waiting.done():
                waiting.set_exception(error)
        template.answers.clear()
        if self.templates.get(template.key) is template:
            del self.templates[template.key]  # the next fork starts a fresh one
        self._close(template)  # not retired: its exit is its own (_exited restarts it)

    # --- templates -----------------------------------------------------------------------

    def _template(self, spec: AgentSpec) -> Template:
        """The template to fork `spec` from: its key's, or its successor once it is used up."""
        key = template_key(spec)
        template = self.templates.get(key)
        if template is not None and template.forks >= FORKS_PER_TEMPLATE:
            successor, template.successor = template.successor, None
            if successor is None or successor.closed or successor.retired:
                successor = self._start(key, spec)  # none warming (or it died): one now
            self.retire_template(template)  # its agents live on; it exits
            template = self.templates[key] = successor
        if template is None:
            template = self.templates[key] = self._start(key, spec)
        return template

    def _count(self, template: Template, spec: AgentSpec) -> None:
        """One more fork from `template`; half way through, its successor starts warming,
        so that no start waits for an import when it takes over."""
        template.forks += 1
        if template.forks == FORKS_PER_TEMPLATE // 2 and template.successor is None:
            try:
                template.successor = self._start(template.key, spec)
            except OSError as exc:  # _template tries again when it is needed
                self.log.error("template.start_failed", module=spec.module, error=str(exc))

    def _start(self, key: TemplateKey, spec: AgentSpec) -> Template:
        """Start a template process for `key` (raises OSError); it says hello once warm."""
        assert spec.module is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = spawn.agent_env(spec, 0, self.daemon.bus, self.daemon.keys_dir, self.daemon.state_dir)
        for name in PER_AGENT:
            env.pop(name, None)
        argv = (spec.argv[0], "-m", "agentd.agents.template", spec.module, str(theirs.fileno()))
        try:
            popen = spawn.start_process(
                argv,
                spec,
                env,
                self.daemon.death_signal,
                pass_fds=(theirs.fileno(),),
                stdout=subprocess.DEVNULL,
                stderr=None,  # the daemon's: an import traceback comes in the hello
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        if self.guard is not None:
            self.guard.add(popen.pid)
        template = Template(key, spec, popen, ours, self.loop.create_future())
        self.loop.add_reader(ours, self._readable, template)
        reaper.watch(popen.pid, lambda status: self._exited(template, status))
        self.log.info("template.started", pid=popen.pid, module=spec.module, agent=spec.name)
        return template

    def _exited(self, template: Template, status: int) -> None:
        """The template exited (the reaper reaps it): start it again if it died on its own."""
        template.popen.returncode = os.waitstatus_to_exitcode(status)
        if self.guard is not None:
            self.guard.remove(template.pid)
        on_its_own = not template.retired and not self._closing
        self.retire_template(template)
        if on_its_own:  # started again, warm for the next start (unless one already is)
            self.log.warning("template.exited", pid=template.pid, code=template.popen.returncode)
            self.loop.call_later(RESTART_DELAY, self._restart, template.key)

    def _restart(self, key: TemplateKey) -> None:
        spec = self.wanted(key)
        if spec is None or key in self.templates or self._closing:
            return
        try:
            self.templates[key] = self._start(key, spec)
        except OSError as exc:
            self.log.error("template.start_failed", module=spec.module, error=str(exc))

    def retire(self, specs: list[AgentSpec]) -> None:
        """Replace the templates of these agents: their next start imports the code afresh."""
        for key in {template_key(s) for s in specs if s.start == "fork"}:
            template = self.templates.get(key)
            if template is not None:
                self.retire_template(template)

    def retire_unwanted(self) -> None:
        """Retire the templates no agent needs any more (a reload removed or changed them)."""
        for key, template in list(self.templates.items()):
            if self.wanted(key) is None:
                self.retire_template(template)

    def retire_template(self, template: Template) -> None:
        """No new fork from it; it exits on EOF, once the forks it is doing have answered.

        Its successor, if one is warming, goes too: it has imported the same code.
        """
        if self.templates.get(template.key) is template:
            del self.templates[template.key]
        successor, template.successor = template.successor, None
        if successor is not None:
            self.retire_template(successor)
        if template.retired:
            return
        template.retired = True
        if not template.answers:
            self._close(template)

    def _close(self, template: Template) -> None:
        if template.closed:
            return
        template.closed = True
        self.loop.remove_reader(template.sock)
        template.sock.close()
        _fail(template.hello, _Retired("the template was retired before it was ready"))
        if template.popen.returncode is None:
            self.loop.call_later(RETIRE_GRACE, self._kill, template)

    def _kill(self, template: Template) -> None:
        if template.popen.returncode is None:
            try:
                os.kill(template.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Daemon exit: every template goes at once (no agent depends on one)."""
        self._closing = True
        for template in list(self.templates.values()):
            del self.templates[template.key]
            for one in (template, template.successor):
                if one is not None:
                    one.retired = True
                    self._kill(one)


def _fail(future: asyncio.Future[Hello], error: ForkError) -> None:
    """Settle a hello nobody may ever await, without an 'exception never retrieved'."""
    if not future.done():
        future.set_exception(error)
        future.exception()


def _decode(data: bytes) -> object:
    """A message from the template; b"" (EOF: it exited) and garbage are described."""
    if not data:
        return "EOF"
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        return f"bad message: {exc}"
