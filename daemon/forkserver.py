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
death kills no agent — after the double fork they are not its children, and
each has its own session); `retire` replaces it so new code runs (reload,
`ctl restart`). A module that fails to import fails the start with its
traceback (`ForkError`), and the next start tries a fresh template.

Reaping: a forked agent becomes the daemon's child when the template's
intermediate child exits, which may be before its pid has come back over the
socket. Each fork in flight holds the reaper (reaper.py), which leaves an
unknown zombie alone meanwhile, so no agent is ever reaped as an orphan.
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


class ForkError(Exception):
    """The fork did not happen; the message (a traceback, maybe) is the stderr tail."""


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

    The socket is used (and closed) only under `lock`: one request at a time, and
    no close under a pending read.
    """

    key: TemplateKey
    spec: AgentSpec  # the first agent spec that needed it (to start it again)
    popen: subprocess.Popen[bytes]
    sock: socket.socket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    hello: Hello | None = None
    retired: bool = False  # no new user: it is closed (or being closed)
    closed: bool = False

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
        self._tasks: set[asyncio.Task[None]] = set()

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
            nofile=spec.limits.nofile,
            cpu_seconds=spec.limits.cpu_seconds,
            cgroup_dir=cgroup_dir,
            cgroup_procs=cgroup_procs or [],
        )
        with reaper.hold():  # the agent is our child before its pid is back
            for _ in range(3):  # a template closed while we queued: take the fresh one
                template = self._template(spec)
                async with template.lock:
                    if template.closed:
                        continue
                    await self._greeted(template, max(spec.heartbeat, HELLO_TIMEOUT))
                    return await self._ask(template, request, stdout, stderr)
            raise ForkError("no template stayed up long enough to fork")

    async def _greeted(self, template: Template, timeout: float) -> None:
        """The template's hello (read once): it imported the module, or why not."""
        if template.hello is None:
            try:
                data = await asyncio.wait_for(
                    self.loop.sock_recv(template.sock, MAX_MESSAGE), timeout
                )
            except TimeoutError:
                self.retire_template(template)
                raise ForkError(
                    f"the template did not import {template.spec.module} in {timeout}s"
                ) from None
            message = _decode(data)
            if not isinstance(message, Hello):
                self.retire_template(template)
                raise ForkError(f"the template exited before it was ready ({message})")
            template.hello = message
        if template.hello.error is not None:
            self.retire_template(template)  # the next start tries a fresh import
            raise ForkError(template.hello.error.rstrip())

    async def _ask(self, template: Template, request: ForkRequest, stdout: int, stderr: int) -> int:
        """One request, one answer: the agent's pid."""
        try:
            socket.send_fds(template.sock, [encode(request)], [stdout, stderr])
            data = await asyncio.wait_for(
                self.loop.sock_recv(template.sock, MAX_MESSAGE), FORK_TIMEOUT
            )
        except TimeoutError:
            self.retire_template(template)
            raise ForkError(f"the template did not fork in {FORK_TIMEOUT}s") from None
        except OSError as exc:
            raise ForkError(f"the template exited ({exc})") from None
        message = _decode(data)
        if not isinstance(message, Forked) or message.name != request.name:
            self.retire_template(template)
            raise ForkError(f"the template exited during the fork ({message})")
        if message.error is not None:
            raise ForkError(f"fork failed: {message.error}")
        return message.pid

    # --- templates -----------------------------------------------------------------------

    def _template(self, spec: AgentSpec) -> Template:
        key = template_key(spec)
        template = self.templates.get(key)
        if template is None:
            template = self.templates[key] = self._start(key, spec)
        return template

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
        template = Template(key, spec, popen, ours)
        reaper.watch(popen.pid, lambda status: self._exited(template, status))
        self.log.info("template.started", pid=popen.pid, module=spec.module, agent=spec.name)
        return template

    def _exited(self, template: Template, status: int) -> None:
        """The template exited (the reaper reaps it): start it again if it died on its own."""
        template.popen.returncode = os.waitstatus_to_exitcode(status)
        if self.guard is not None:
            self.guard.remove(template.pid)
        on_its_own = not template.retired and not self._closing
        was_current = self.templates.get(template.key) is template
        self.retire_template(template)
        if on_its_own:
            self.log.warning("template.exited", pid=template.pid, code=template.popen.returncode)
            if was_current:
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
        """No new fork from it; it exits on EOF once the fork it may be doing has answered."""
        if self.templates.get(template.key) is template:
            del self.templates[template.key]
        if template.retired:
            return
        template.retired = True
        task = self.loop.create_task(self._close(template))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, template: Template) -> None:
        async with template.lock:
            template.closed = True
            template.sock.close()
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
            template.retired = True
            self._kill(template)


def _decode(data: bytes) -> object:
    """A message from the template; b"" (EOF: it exited) and garbage are described."""
    if not data:
        return "EOF"
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        return f"bad message: {exc}"
