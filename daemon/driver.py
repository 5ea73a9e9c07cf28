"""The driver: the pure tree joined to a runtime, and every command that changes them.

Data flows one way. The tree decides (pure), `apply` carries its actions out
through the runtime, and what the runtime observes (ready, exited, hung) goes
back into the tree as inputs. ctl commands (stop, start, restart, pause, resume,
scale, reload) are more inputs, each waiting on the tree's state (`wait_until`,
no polling) until the change is done.

The driver owns no process and no socket: the runtime is whatever carries out
Start/Stop/Pause/Resume (daemon/runtime.py's ProcessRuntime, or a fake one in the
tests), the clock and the timers are injected, and what only the daemon can do
(the notifier, the exit status, the broker's view) goes out through `Outcomes`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterator, Mapping, ValuesView
from typing import Any, Protocol

import msgspec

from agentd.bus.log import get_logger

from . import reload as reloading
from .events import EventLog
from .spec import AgentSpec, Spec
from .tree import (
    Action,
    Note,
    Pause,
    Policy,
    Resume,
    SetTimer,
    Start,
    Stop,
    Tree,
    TreeFailed,
    TreeReady,
    TreeStopped,
)

Predicate = Callable[[], bool]
CallLater = Callable[[float, Callable[..., None], Any], Any]


class Runtime(Protocol):
    """What the driver asks of a runtime (ProcessRuntime's side the tree needs)."""

    agents: Any
    procs: dict[str, Any]
    last_exit: dict[str, Any]

    def start(self, name: str, incarnation: int) -> None: ...
    def stop(self, name: str) -> None: ...
    def pause(self, name: str) -> bool: ...
    def resume(self, name: str) -> bool: ...
    def frozen(self, name: str) -> bool: ...
    def kill(self, name: str, reason: str, incarnation: int) -> None: ...
    def mark_ready(self, name: str, incarnation: int) -> None: ...
    def retire_templates(self, names: list[str] | None = None) -> None: ...


class Outcomes(Protocol):
    """What the tree's outcomes and an agent's exit mean to the daemon around the driver."""

    def tree_ready(self, agents: int) -> None: ...
    def tree_failed(self, reason: str) -> None: ...
    def tree_stopped(self) -> None: ...
    def agent_exited(self, name: str, incarnation: int) -> None: ...
    def agents_changed(self, spec: Spec, names: Collection[str] | None = None) -> None: ...


class Children(Protocol):
    """The dynamic children (daemon/dynamic.py), as reload and an exit concern them."""

    def carry(self, new: Spec) -> Spec: ...
    def save_quietly(self) -> None: ...
    def sweep(self, name: str) -> None: ...


def tree_from_spec(spec: Spec) -> Tree:
    """Build the state machine from a validated spec."""
    agents = {name: Policy.of(a) for name, a in spec.agents.items()}
    return Tree(spec.supervisors, agents, root=spec.root)


class Agents(Mapping[str, AgentSpec]):
    """The running spec's agents, always the current ones: the one agent table.

    The runtime reads it (what to start, which template to fork from) instead of a
    copy kept in step by hand; the broker is told of every change (`Outcomes.agents_changed`),
    since it runs in another process.
    """

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    def __getitem__(self, name: str) -> AgentSpec:
        return self._driver.spec.agents[name]

    def __contains__(self, name: object) -> bool:
        return name in self._driver.spec.agents

    def __iter__(self) -> Iterator[str]:
        return iter(self._driver.spec.agents)

    def __len__(self) -> int:
        return len(self._driver.spec.agents)

    def values(self) -> ValuesView[AgentSpec]:
        return self._driver.spec.agents.values()


def _loop_call_later(delay: float, callback: Callable[..., None], arg: Any) -> Any:
    return asyncio.get_running_loop().call_later(delay, callback, arg)


class Driver:
    """The running tree, the running spec and the runtime that carries the tree out."""

    def __init__(
        self,
        spec: Spec,
        events: EventLog,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float] = time.monotonic,
        call_later: CallLater = _loop_call_later,
    ) -> None:
        self.spec = spec  # the running spec: reload, scale and spawn replace it (set_spec)
        self.agents = Agents(self)
        self.events = events
        self.outcomes = outcomes
        self.clock = clock
        self.call_later = call_later
        self.tree = tree_from_spec(spec)
        self.view = self.tree.view  # what the other modules read of it
        self.runtime: Runtime | None = None
        self.children: Children | None = None
        self.log = get_logger("agentd")
        self.ready = False
        self.stopping = False
        self.exits: dict[str, int] = {}
        self._waiters: list[tuple[Predicate, asyncio.Future[None]]] = []
        self._pool_templates: dict[str, AgentSpec] = {}
        self._resumed_at: dict[str, float] = {}  # ctl resume: no hung verdict for a heartbeat

    def now(self) -> float:
        return self.clock()

    def attach(self, runtime: Runtime) -> None:
        """The runtime that carries out the actions (made once the daemon has its guard).

        It reads the driver's agent table from now on, never a copy of it.
        """
        self.runtime = runtime
        runtime.agents = self.agents

    # --- tree <-> runtime ---------------------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        """Carry out the tree's decisions."""
        assert self.runtime is not None
        for action in actions:
            match action:
                case Start(name=name, incarnation=incarnation):
                    self.runtime.start(name, incarnation)
                case Stop(name=name):
                    self.runtime.stop(name)
                case Pause(name=name):
                    if self.runtime.pause(name):
                        self.events.emit("agent.paused", name)
                case Resume(name=name):
                    if self.runtime.resume(name):
                        self._resumed_at[name] = self.now()
                        self.events.emit("agent.resumed", name)
                case SetTimer(key=key, delay=delay):
                    self.call_later(delay, self.timer, key)
                case Note(event=event, name=name, detail=detail):
                    self.events.emit(event, name, **detail)
                case TreeReady():
                    self.ready = True
                    count = len(self.view.agents())
                    self.events.emit("daemon.ready", "agentd", agents=count)
                    self.outcomes.tree_ready(count)
                case TreeFailed(reason=reason):
                    self.outcomes.tree_failed(reason)
                case TreeStopped():
                    self.outcomes.tree_stopped()
        self._check_waiters()

    def start(self) -> None:
        """Start the whole tree, children in order."""
        self.apply(self.tree.start(self.now()))

    def shutdown(self) -> None:
        """Stop the whole tree in reverse order (the daemon's stop)."""
        self.stopping = True
        self.apply(self.tree.shutdown(self.now()))

    def abandon(self) -> None:
        """kill_all: the runtime kills every agent; the tree starts nothing more."""
        self.stopping = True
        self.apply(self.tree.abandon(self.now()))

    def timer(self, key: str) -> None:
        self.apply(self.tree.timer(key, self.now()))

    def agent_started(self, name: str, incarnation: int) -> None:
        self.apply(self.tree.started(name, self.now(), incarnation))

    def agent_exited(self, name: str, incarnation: int, info: Any) -> None:
        self.exits[name] = self.exits.get(name, 0) + 1
        self.outcomes.agent_exited(name, incarnation)
        self.apply(
            self.tree.exited(
                name,
                self.now(),
                abnormal=info.abnormal,
                reason=info.reason,
                incarnation=incarnation,
            )
        )
        if self.children is not None:
            self.children.sweep(name)

    def agent_ready(self, name: str, incarnation: int) -> None:
        """READY from the bus."""
        assert self.runtime is not None
        self.runtime.mark_ready(name, incarnation)

    def agent_hung(self, name: str, incarnation: int) -> None:
        """No heartbeat in time (the broker's verdict): kill it, unless frozen on purpose."""
        assert self.runtime is not None
        proc = self.runtime.procs.get(name)
        if proc is None or proc.incarnation != incarnation or proc.stopping:
            return
        resumed = self._resumed_at.get(name)
        if proc.paused or (resumed is not None and self.now() - resumed < proc.spec.heartbeat):
            return  # frozen on purpose, or not had a heartbeat's time since: not hung
        self.events.emit("agent.hung", name, pid=proc.pid, incarnation=incarnation)
        self.runtime.kill(name, "hung", incarnation)

    # --- the running spec ---------------------------------------------------------------

    def set_spec(self, spec: Spec, names: Collection[str] | None = None) -> None:
        """The running spec changed (reload, scale, spawn): the runtime reads the new one
        through `agents`; the broker, in its own process, is told. `names`: only these
        agents changed (None: any may have)."""
        self.spec = spec
        self.outcomes.agents_changed(spec, names)

    def add(self, supervisor: str, name: str, agent: AgentSpec) -> None:
        """A new agent `name` under `supervisor` (a spawn): the tree starts it in its turn."""
        self.apply(
            self.tree.add_child(supervisor, name, self.now(), agents={name: Policy.of(agent)})
        )

    def remove(self, name: str) -> None:
        """Stop `name` and forget it once stopped (a terminate, or a child ended for good)."""
        self.apply(self.tree.remove_child(name, self.now()))

    # --- waiting on state ----------------------------------------------------------

    def _check_waiters(self) -> None:
        for predicate, future in list(self._waiters):
            if future.done():
                self._waiters.remove((predicate, future))
            elif predicate():
                future.set_result(None)
                self._waiters.remove((predicate, future))

    async def wait_until(self, predicate: Predicate, timeout: float) -> bool:
        """Wait (without polling) until `predicate()` holds after some tree input."""
        if predicate():
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        return True

    def start_timeout(self, names: list[str]) -> float:
        specs = [self.spec.agents[n] for n in names if n in self.spec.agents]
        worst = max((max(a.start_seconds, a.heartbeat) + a.restart_delay for a in specs), default=1)
        return 10.0 + worst * max(1, len(specs))

    def stop_timeout(self, names: list[str]) -> float:
        specs = [self.spec.agents[n] for n in names if n in self.spec.agents]
        # An agent with shutdown = "infinity" is waited for as long as a daemon stop.
        bound = self.spec.daemon.shutdown_timeout
        return 10.0 + sum(min(a.shutdown or 0, bound) for a in specs)

    # --- ctl commands -----------------------------------------------------------------

    def expand(self, name: str) -> list[str]:
        """A ctl name: an agent instance, a pool (all members) or a supervisor."""
        if name in self.view:
            return [name]
        if name in self.spec.pools:
            return [n for n, a in self.spec.agents.items() if a.pool == name]
        return []

    async def stop_agents(self, names: list[str]) -> None:
        for name in names:
            self.apply(self.tree.stop_child(name, self.now()))
        await self.wait_until(
            lambda: all(self.view.state(n) in ("stopped", "failed") for n in names),
            self.stop_timeout(names),
        )

    async def pause_agents(self, names: list[str]) -> list[str]:
        """ctl pause: freeze running agents; the names that are not (or not yet) paused."""
        for name in names:
            self.apply(self.tree.pause_child(name, self.now()))
        assert self.runtime is not None
        deadline = self.now() + 5.0
        while not all(self.runtime.frozen(n) for n in names if self.view.state(n) == "paused"):
            if self.now() > deadline:
                break
            await asyncio.sleep(0.005)  # the kernel freezes in the background: a few ms
        return [n for n in names if not self.runtime.frozen(n)]

    async def resume_agents(self, names: list[str]) -> list[str]:
        """ctl resume: thaw paused agents; the names that were not paused."""
        refused = [n for n in names if self.view.state(n) != "paused"]
        for name in names:
            self.apply(self.tree.resume_child(name, self.now()))
        return refused

    async def start_agents(self, names: list[str]) -> list[str]:
        """ctl start; the names that did not reach running."""
        exits = {n: self.exits.get(n, 0) for n in names}
        for name in names:
            self.apply(self.tree.start_child(name, self.now()))
        return await self.await_running(names, exits)

    async def restart_agents(self, names: list[str]) -> list[str]:
        exits = {n: self.exits.get(n, 0) for n in names}
        before = {n: self.view.child(n).incarnation for n in names}
        assert self.runtime is not None
        # New templates, so the restart runs the code on disk (SPEC §12).
        self.runtime.retire_templates(self._agents_under(names))
        for name in names:
            self.apply(self.tree.restart_child(name, self.now()))
        return await self.await_running(names, exits, before)

    def _agents_under(self, names: list[str]) -> list[str]:
        """The agents among `names` and under the supervisors among them."""
        wanted, out = set(names), []
        for agent in self.view.agents():
            node = agent
            while node not in wanted and node != self.view.root:
                node = self.view.supervisor_of(node)
            if node in wanted:
                out.append(agent)
        return out

    async def await_running(
        self,
        names: list[str],
        exits: dict[str, int],
        before: dict[str, int] | None = None,
        timeout: float | None = None,
    ) -> list[str]:
        """Wait until each of `names` runs (a fresh incarnation, with `before`) or has failed;
        the names that do not run."""

        def settled(name: str) -> bool:
            if name not in self.view:
                return True
            child = self.view.child(name)
            if self._failed_since(name, exits, before):
                return True
            fresh = before is None or child.incarnation > before[name]
            return child.state == "running" and fresh

        timeout = self.start_timeout(names) if timeout is None else timeout
        await self.wait_until(lambda: all(settled(n) for n in names), timeout)
        return [
            n
            for n in names
            if n not in self.view
            or self.view.state(n) != "running"
            or self._failed_since(n, exits, before)
        ]

    def _failed_since(
        self, name: str, exits: dict[str, int], before: dict[str, int] | None
    ) -> bool:
        """Did `name` exit (other than by our stop) since the command began?"""
        allowed = 1 if before is not None else 0  # a restart's own stop
        if self.view.child(name).is_supervisor:
            return False
        return self.exits.get(name, 0) - exits.get(name, 0) > allowed and (
            self.view.state(name) != "running"
        )

    async def scale(self, pool: str, count: int) -> dict[str, Any]:
        """Grow or shrink a pool: a reload of the running spec with the pool's size changed.

        The highest-numbered members stop first.
        """
        members = reloading.members(self.spec, pool)
        template = self.spec.agents[members[0]] if members else self._pool_template(pool)
        self._pool_templates[pool] = template
        new = reloading.scaled(self.spec, pool, count, template)
        plan = reloading.diff(self.spec, new)
        plan.removed.reverse()  # highest-numbered first
        self._change(new, plan)
        added = [a.name for a in plan.added]
        removed = members[count:]
        await self.wait_until(
            lambda: (
                all(n not in self.view for n in removed)
                and all(self.view.state(n) == "running" for n in added if n in self.view)
            ),
            self.start_timeout(added) + self.stop_timeout(removed),
        )
        return {"pool": pool, "replicas": count, "added": added, "removed": removed}

    def _pool_template(self, pool: str) -> AgentSpec:
        try:
            return self._pool_templates[pool]
        except KeyError:
            raise LookupError(f"pool `{pool}` has no members to copy") from None

    def _change(self, new: Spec, plan: reloading.Plan) -> None:
        """Make `new` the running spec and carry `plan` (its diff) out in the tree."""
        assert self.runtime is not None
        for pool in new.pools:
            members = [a for a in new.agents.values() if a.pool == pool]
            if members:
                self._pool_templates[pool] = members[0]
        self.set_spec(msgspec.structs.replace(new, daemon=self.spec.daemon))
        self.runtime.retire_templates()  # those no agent uses now
        self.runtime.retire_templates(plan.changed_agents)  # changed: new code too
        now = self.now()
        for name in plan.removed:
            self.apply(self.tree.remove_child(name, now))
        self.tree.update_supervisor(new.supervisors[new.root])
        for name in plan.changed_supervisors:
            self.tree.update_supervisor(new.supervisors[name])
        for item in plan.added:
            agents, supervisors = reloading.subtree(new, item.name)
            self.apply(
                self.tree.add_child(
                    item.parent,
                    item.name,
                    now,
                    agents=agents,
                    supervisors=supervisors,
                    index=item.index,
                )
            )
        for name in plan.changed_agents:
            spec = new.agents[name]
            self.tree.set_agent(name, Policy.of(spec))
            self.apply(self.tree.restart_child(name, now))
        for name in plan.changed_supervisors:
            if name != new.root:
                self.apply(self.tree.restart_child(name, now))

    async def reload(self, new: Spec) -> dict[str, Any]:
        """Apply the difference between the running spec and `new`."""
        if self.children is not None:
            new = self.children.carry(new)  # running dynamic children stay, from the new template
        plan = reloading.diff(self.spec, new)
        before = {n: self.view.child(n).incarnation for n in plan.changed_agents}
        self._change(new, plan)
        if self.children is not None:
            self.children.save_quietly()
        added = [a.name for a in plan.added]
        removed = list(plan.removed)

        def done() -> bool:
            if any(n in self.view for n in removed):
                return False
            for n in added + plan.changed_supervisors:
                if n in self.view and self.view.state(n) in (
                    "starting",
                    "stopping",
                    "stopped",
                ):
                    return False
            return all(
                self.view.child(n).incarnation > before[n]
                and self.view.state(n) not in ("starting", "stopping")
                for n in plan.changed_agents
            )

        await self.wait_until(done, 60.0)
        self.events.emit(
            "daemon.reloaded",
            "agentd",
            added=added,
            removed=removed,
            changed=plan.changed_agents + plan.changed_supervisors,
        )
        result = {
            "added": added,
            "removed": removed,
            "changed": plan.changed_agents + plan.changed_supervisors,
        }
        if plan.daemon_changed:
            result["warning"] = "[daemon] settings changed: restart agentd to apply them"
        return result
