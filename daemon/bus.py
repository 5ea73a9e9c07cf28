"""The bus broker as the daemon runs it: outside the user's tree, always restarted.

The broker is its own process (`python -m agentd.bus.broker`), started before
the tree and stopped after it. If it dies it is restarted at once — no
intensity, no delay: agents reconnect by themselves and the daemon re-sends
the agent table. The daemon hears from the broker through a `BrokerLink`:
READY makes a bus agent *started* in the tree, heartbeat silence makes it
`hung`, and the broker's notices (a dead letter, a journal that cannot be
written) become events in the daemon's event log.

The broker keeps its journal in `state_dir` (`bus.journal`): acknowledged
delivery survives the broker, the daemon and a stop and start of both.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from agentd.bus.endpoint import parse_endpoint

from .events import Event, EventLog
from .runtime import ExitInfo, Guard, Proc, ProcessRuntime
from .spec import AgentSpec, DaemonSpec, Spec

if TYPE_CHECKING:  # the bus modules load when the broker starts, not on import
    from agentd.bus.envelope import Stats
    from agentd.bus.link import AgentEntry, Notice

NAME = "bus"
QUICK = 1.0  # seconds: a broker that dies sooner than this after starting failed to start
BACKOFF_FIRST = 0.1  # then 0.2, 0.4, ... seconds before the next try
BACKOFF_MAX = 5.0
# emit()'s own arguments and the keys of a JSON log line: an info key may not shadow them.
_OWN_FIELDS = frozenset({"event", "name", "agent", "level", "timestamp"})
JOURNAL = "bus.journal"  # the broker's journal file, in state_dir
TABLE_WAIT = 5.0  # seconds a new broker holds signals for the daemon's table
STATS_TIMEOUT = 0.5  # seconds a status or a metrics scrape waits for the broker's figures


def broker_spec(daemon: DaemonSpec) -> AgentSpec:
    """The broker as a process: its endpoint, limits and journal come from [daemon]."""
    argv = (
        sys.executable,
        "-m",
        "agentd.bus.broker",
        "--endpoint",
        daemon.bus,
        "--max-frame",
        str(daemon.max_frame),
        "--log-format",
        "json",
        "--journal",
        os.path.join(daemon.state_dir, JOURNAL),
        "--journal-sync",
        daemon.journal_sync,
        # Its table comes from us: until it does, a new broker cannot tell which names
        # are configured (or ack) and would refuse signals to agents it has not seen.
        "--table-wait",
        str(TABLE_WAIT),
    )
    if daemon.keys_dir and parse_endpoint(daemon.bus).needs_keys:
        argv += ("--keys-dir", daemon.keys_dir)
    return AgentSpec(
        name=NAME, pool=None, argv=argv, bus_agent=False, start_seconds=0, shutdown=5.0
    )


def agent_entry(a: AgentSpec) -> AgentEntry:
    """The broker's view of one configured agent instance."""
    from agentd.bus.link import AgentEntry

    return AgentEntry(
        name=a.name,
        pool=a.pool,
        subscribe=list(a.subscribe),
        ack=a.ack,
        heartbeat=a.heartbeat,
        max_deliveries=a.max_deliveries,
        retry_backoff=a.retry_backoff,
        max_in_flight=a.max_in_flight,
        max_pending=a.max_pending,
    )


def agent_table(spec: Spec) -> list[AgentEntry]:
    """The broker's view of the configured agents: `AgentEntry` rows, one per instance."""
    return [agent_entry(a) for a in spec.agents.values()]


def notice_event(events: EventLog, notice: Notice) -> Event:
    """A broker notice (bus.dead_lettered, bus.dropped, bus.journal_*) as a daemon event.

    `ctl events` and the daemon's JSON log then show it like any other event. An
    info key that would clash with the event's own fields gets a trailing `_`.
    """
    data = {(f"{k}_" if k in _OWN_FIELDS else k): v for k, v in notice.info.items()}
    return events.emit(notice.event, notice.agent, **data)


class BrokerChild:
    """Runs, restarts and talks to the broker process."""

    def __init__(
        self,
        daemon: DaemonSpec,
        events: EventLog,
        guard: Guard,
        on_ready: Callable[[str, int], None],
        on_hung: Callable[[str, int], None],
        on_request: Callable[[Any, Callable[[bool, str | None], None]], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.on_request = on_request  # a peer's spawn/terminate (daemon/dynamic.py)
        self.events = events
        self.on_ready = on_ready
        self.on_hung = on_hung
        self.process_runtime = ProcessRuntime(
            daemon,
            {NAME: broker_spec(daemon)},
            events,
            on_started=lambda name, inc: None,
            on_exited=self._exited,
            guard=guard,
        )
        self.incarnation = 0
        # by the reason of the exit each restart followed, as the tree counts its agents'
        self.restarts_by_reason: dict[str, int] = {}
        self.stopping = False
        self._stopped: asyncio.Future[None] | None = None
        self.link: Any = None
        self._started = 0.0
        self._quick_fails = 0
        self._timer: asyncio.TimerHandle | None = None
        self._abort = asyncio.Event()

    async def start(self, spec: Spec) -> None:
        """Spawn the broker, connect the link, and wait until the broker confirms the table."""
        from agentd.bus.link import BrokerLink

        self._spawn()
        self.link = BrokerLink(
            self.daemon.bus,
            self._on_event,
            keys_dir=self.daemon.keys_dir,
            on_notice=self._on_notice,
            on_request=self.on_request,
            max_frame=self.daemon.max_frame,
        )
        await self.link.start()
        self.set_agents(spec)
        # Agents start after this: their READY must find the link already known to the broker.
        confirmed = asyncio.ensure_future(self.link.wait_confirmed(10.0))
        aborted = asyncio.ensure_future(self._abort.wait())
        await asyncio.wait([confirmed, aborted], return_when=asyncio.FIRST_COMPLETED)
        aborted.cancel()
        if not confirmed.done():
            confirmed.cancel()  # stopping already
        elif not confirmed.result():
            self.events.emit("bus.slow_start", NAME, detail="no table confirmation in 10 s")

    def set_agents(self, spec: Spec, names: Collection[str] | None = None) -> None:
        """Tell the broker which agents exist (for hold queues, pools, acks, heartbeats).

        `names`: only these changed (a spawn, a terminate), so only they are looked at;
        None: any may have (a reload).
        """
        if self.link is None:
            return
        if names is None:
            self.link.set_agents(agent_table(spec))
            return
        agents = spec.agents
        self.link.update(
            [agent_entry(agents[n]) for n in names if n in agents],
            [n for n in names if n not in agents],
        )

    @property
    def restarts(self) -> int:
        return sum(self.restarts_by_reason.values())

    async def stats(self) -> Stats | None:
        """The broker's counters and per-agent figures; None if it is down or does not answer.

        Asked over the link with a short timeout: a scrape or a `ctl status` never waits
        long on a broker that is restarting or busy.
        """
        if self.link is None or self.proc() is None:
            return None
        return await self.link.stats(STATS_TIMEOUT)

    def _on_event(self, event: Any) -> None:
        if event.kind == "ready":
            self.on_ready(event.name, event.incarnation)
        elif event.kind == "hung":
            self.on_hung(event.name, event.incarnation)

    def _on_notice(self, notice: Notice) -> None:
        notice_event(self.events, notice)

    def _exited(self, name: str, incarnation: int, info: ExitInfo) -> None:
        if self.stopping:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            return
        # Restarted at once: every agent's traffic depends on it. One that cannot even
        # start (its tcp port taken, say) backs off instead of spinning a core.
        ran = time.monotonic() - self._started
        self._quick_fails = self._quick_fails + 1 if ran < QUICK else 0
        delay = 0.0
        if self._quick_fails:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._quick_fails - 1))
        by = self.restarts_by_reason
        by[info.reason] = by.get(info.reason, 0) + 1
        self.events.emit("agent.restarting", NAME, restarts=self.restarts, delay=delay)
        if delay:
            self._timer = asyncio.get_running_loop().call_later(delay, self._restart)
        else:
            self._restart()

    def _restart(self) -> None:
        self._timer = None
        if self.stopping:
            return
        self.incarnation += 1
        self._spawn()
        if self.link is not None:
            self.link.broker_restarted()

    def _spawn(self) -> None:
        self._started = time.monotonic()
        self.process_runtime.start(NAME, self.incarnation)

    def abort_start(self) -> None:
        """The daemon is stopping: do not wait any longer for a broker that will not bind."""
        self._abort.set()

    async def stop(self) -> None:
        """Stop the broker last, after the tree."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
        if self.link is not None:
            await self.link.close()
            self.link = None
        if NAME not in self.process_runtime.procs:
            return
        self._stopped = asyncio.get_running_loop().create_future()
        self.process_runtime.stop(NAME)
        await asyncio.wait([self._stopped], timeout=10)

    def agent_exited(self, name: str, incarnation: int) -> None:
        """Hold the agent's traffic from now on, not from when ZeroMQ notices."""
        if self.link is not None:
            self.link.agent_down(name, incarnation)

    def proc(self) -> Proc | None:
        return self.process_runtime.procs.get(NAME)

    def last_exit(self) -> ExitInfo | None:
        return self.process_runtime.last_exit.get(NAME)

    def close_logs(self) -> None:
        self.process_runtime.close_logs()
