"""The daemon's control socket: a ROUTER serving `agentd ctl` commands.

Each request is handled in its own task so a slow command (a stop with a
long grace, a reload) or a `-f` stream never blocks the others. Commands
that change state return once the change is done: the driver's commands
wait on the tree's state (`Driver.wait_until`).

The commands see the daemon only through `Controlled`: the driver, the
dynamic children, the event log, and the few things only the daemon does
(status from one /proc pass, logs, reload from the file, shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from agentd.bus.endpoint import parse_endpoint
from agentd.bus.log import get_logger

from .dynamic import SpawnError
from .events import NotHeld
from .locate import ConfigError
from .protocol import Ack, Item, Reply, Request, decoder, encoder

if TYPE_CHECKING:
    from .driver import Driver
    from .dynamic import Dynamic
    from .events import EventLog
    from .metrics import MetricsEndpoint

Send = Callable[[Any], Awaitable[bool]]


class Controlled(Protocol):
    """What the ctl commands need of the daemon (service.Daemon is one)."""

    driver: Driver
    dynamic: Dynamic
    events: EventLog
    metrics: MetricsEndpoint | None

    async def status_rows(self) -> list[dict[str, Any]]: ...
    def isolation_status(self) -> dict[str, Any]: ...
    def tree_view(self) -> dict[str, Any]: ...
    def log_tail(self, name: str, lines: int) -> list[str]: ...
    def follow_log(self, name: str) -> asyncio.Queue[str]: ...
    def unfollow_log(self, name: str, queue: asyncio.Queue[str]) -> None: ...
    async def reload_from_file(self) -> dict[str, Any]: ...
    async def shutdown_and_wait(self) -> None: ...


class Refused(Exception):
    """A command that cannot be done (unknown agent, bad state): ctl exits 1."""


class ControlServer:
    """Binds `daemon.control` and dispatches requests to the daemon."""

    def __init__(self, daemon: Controlled, endpoint: str, keys_dir: str | None = None) -> None:
        self.daemon = daemon
        self.endpoint = parse_endpoint(endpoint)
        self.keys_dir = keys_dir
        self.log = get_logger("agentd.control")
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self._auth: Any = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._serve_task: asyncio.Task[None] | None = None

    def bind(self) -> None:
        path = self.endpoint.path
        if path and os.path.exists(path):
            if _answers(self.endpoint.url):  # ipc only: a tcp port in use fails the bind
                raise RuntimeError(f"another agentd is already answering on {self.endpoint.url}")
            os.unlink(path)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        if self.endpoint.needs_keys:
            from agentd.bus.keys import server_auth

            keys = self.keys_dir
            assert keys is not None  # config validation requires it for tcp
            self._auth = server_auth(self.ctx, sock, Path(keys))
        sock.bind(self.endpoint.url)
        if path:
            os.chmod(path, 0o660)
            with contextlib.suppress(KeyError, PermissionError):
                os.chown(path, -1, grp.getgrnam("agentd").gr_gid)
        self.sock = sock
        self._serve_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                continue
            identity, payload = frames
            try:
                request = decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            if not isinstance(request, Request):
                continue
            task = asyncio.get_running_loop().create_task(
                self._handle(identity, request), name=f"ctl-{request.cmd}"
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, identity: bytes, frame: Any) -> bool:
        assert self.sock is not None
        try:
            await self.sock.send_multipart([identity, encoder.encode(frame)])
        except zmq.ZMQError:
            return False  # ctl went away (Ctrl-C on a -f stream)
        return True

    async def _handle(self, identity: bytes, request: Request) -> None:
        await self._send(identity, Ack())
        handler = COMMANDS.get(request.cmd)

        async def send(data: Any) -> bool:
            return await self._send(identity, Item(data))

        try:
            if handler is None:
                raise Refused(f"unknown command `{request.cmd}`")
            data = await handler(self.daemon, request.args, send)
            reply = Reply(ok=True, data=data)
        except Refused as exc:
            reply = Reply(ok=False, error=str(exc), code=1)
        except ConfigError as exc:
            reply = Reply(ok=False, error=str(exc), code=1)
        except Exception as exc:  # a bug must not take the control socket down
            self.log.exception("control.error", cmd=request.cmd)
            reply = Reply(ok=False, error=f"internal error: {exc}", code=1)
        await self._send(identity, reply)

    async def close(self) -> None:
        if self._serve_task is not None:
            self._serve_task.cancel()
        # A `shutdown` command is answered once everything has stopped: let it say so.
        answering = [t for t in self.tasks if t.get_name() == "ctl-shutdown"]
        if answering:
            await asyncio.wait(answering, timeout=2.0)
        for task in list(self.tasks):
            task.cancel()
        if self.sock is not None:
            self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        path = self.endpoint.path
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.ctx.term()


def _answers(endpoint: str) -> bool:
    """Is a daemon answering on this endpoint (used before taking over its socket)?"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encoder.encode(Request("ping")))
        return bool(sock.poll(500))
    finally:
        sock.close(0)
        ctx.term()


# --- commands ---------------------------------------------------------------------


def _names(daemon: Controlled, args: dict[str, Any]) -> list[str]:
    """Expand names: a pool's name means all its members."""
    names: list[str] = []
    for name in args.get("names", []):
        found = daemon.driver.expand(name)
        if not found:
            raise Refused(f"unknown agent `{name}`")
        names.extend(found)
    return names


async def cmd_ping(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    return {"pid": os.getpid()}


async def cmd_status(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    wanted = set(_names(daemon, args)) if args.get("names") else None
    rows = await daemon.status_rows()
    if wanted is not None:
        rows = [r for r in rows if r["name"] in wanted]
    return {"agents": rows, "isolation": daemon.isolation_status()}


async def cmd_metrics(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    """The Prometheus text exposition (what `daemon.metrics` serves over HTTP)."""
    assert daemon.metrics is not None
    return await daemon.metrics.exposition(process=not args.get("textfile"))


async def cmd_tree(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    return daemon.tree_view()


async def cmd_stop(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    names = _names(daemon, args)
    await daemon.driver.stop_agents(names)
    return {"stopped": names}


async def cmd_pause(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    names = _agents_only(daemon, _names(daemon, args), "pause")
    refused = await daemon.driver.pause_agents(names)
    if refused:
        raise Refused(f"not running, so not paused: {', '.join(refused)}")
    return {"paused": names}


async def cmd_resume(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    names = _agents_only(daemon, _names(daemon, args), "resume")
    refused = await daemon.driver.resume_agents(names)
    if refused:
        raise Refused(f"not paused: {', '.join(refused)}")
    return {"resumed": names}


def _agents_only(daemon: Controlled, names: list[str], verb: str) -> list[str]:
    supervisors = [n for n in names if daemon.driver.view.child(n).is_supervisor]
    if supervisors:
        raise Refused(f"{verb} takes agents and pools, not supervisors: {', '.join(supervisors)}")
    return names


async def cmd_start(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    names = _names(daemon, args)
    paused = [n for n in names if daemon.driver.view.state(n) == "paused"]
    if paused:
        raise Refused(f"paused (ctl resume them): {', '.join(paused)}")
    failed = await daemon.driver.start_agents(names)
    if failed:
        raise Refused(f"did not start: {', '.join(failed)}")
    return {"started": names}


async def cmd_restart(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    names = _names(daemon, args)
    failed = await daemon.driver.restart_agents(names)
    if failed:
        raise Refused(f"did not start: {', '.join(failed)}")
    return {"restarted": names}


async def cmd_reload(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    try:
        return await daemon.reload_from_file()
    except ConfigError as exc:
        raise Refused("config does not validate; nothing changed\n" + str(exc)) from None


async def cmd_scale(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    name, count = args.get("name", ""), args.get("count")
    if not isinstance(count, int) or count < 0:
        raise Refused("N must be a whole number >= 0")
    if name not in daemon.driver.spec.pools:
        raise Refused(f"`{name}` is not a pool (give it `replicas` in the config)")
    return await daemon.driver.scale(name, count)


async def cmd_spawn(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    """A child of a dynamic supervisor, from its template; answered once it runs."""
    try:
        supervisor, name = args.get("supervisor"), args.get("name")
        return await daemon.dynamic.spawn(supervisor, name, args.get("args"))
    except SpawnError as exc:
        raise Refused(str(exc)) from None


async def cmd_terminate(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    """A dynamic child stopped for good (out of the record); answered once it is gone."""
    try:
        return await daemon.dynamic.terminate(args.get("name"))
    except SpawnError as exc:
        raise Refused(str(exc)) from None


async def cmd_logs(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    name = args.get("name", "")
    if name not in daemon.driver.spec.agents and name != "bus":
        raise Refused(f"unknown agent `{name}`")
    lines = int(args.get("lines", 10))
    queue = daemon.follow_log(name) if args.get("follow") else None  # before history: no gap
    try:
        for line in daemon.log_tail(name, lines):
            await send(line + "\n")
        while queue is not None:
            chunk = await queue.get()
            if not await send(chunk):
                return None
    finally:
        if queue is not None:
            daemon.unfollow_log(name, queue)
    return None


async def cmd_events(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    """History (the last RECENT, or all held after `since`), then with `follow` the rest.

    Everything is read from the ring by seq, live events too, so the stream has
    no gap and no repeat; a `run` other than this daemon's, or a seq the ring no
    longer holds (asked for, or fallen behind while following), is refused.
    """
    events = daemon.events
    since = args.get("since")
    run = args.get("run")
    if run is not None and run != events.run:
        raise Refused(
            f"run {run} is over: this daemon's run is {events.run} (it restarted); "
            f"what run {run} emitted after your seq is only in the daemon's log; "
            f"--since {events.run}:0 reads this run from its start"
        )
    if since is None:
        recent = events.recent()
        seq = recent[0].seq - 1 if recent else events.newest
    elif not isinstance(since, int) or since < 0:
        raise Refused("--since takes [RUN:]SEQ, SEQ a whole number >= 0")
    else:
        seq = since
    while True:
        try:
            batch = events.after(seq)
        except NotHeld as exc:
            skip = f"{events.run}:{events.oldest - 1}"
            raise Refused(f"{exc}; --since {skip} goes on from there, past the gap") from None
        for event in batch:
            if not await send(msgspec.to_builtins(event)):
                return None  # ctl went away
            seq = event.seq
        if not args.get("follow"):
            return None
        await events.wait_beyond(seq)


async def cmd_shutdown(daemon: Controlled, args: dict[str, Any], send: Send) -> Any:
    await daemon.shutdown_and_wait()
    return {"stopped": True}


COMMANDS: dict[str, Callable[[Controlled, dict[str, Any], Send], Awaitable[Any]]] = {
    "ping": cmd_ping,
    "status": cmd_status,
    "tree": cmd_tree,
    "metrics": cmd_metrics,
    "stop": cmd_stop,
    "start": cmd_start,
    "restart": cmd_restart,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "reload": cmd_reload,
    "scale": cmd_scale,
    "spawn": cmd_spawn,
    "terminate": cmd_terminate,
    "logs": cmd_logs,
    "events": cmd_events,
    "shutdown": cmd_shutdown,
}
