"""The supervision tree as a pure state machine (no I/O, injected clock).

Inputs are method calls — `start`, `started`, `exited`, `timer`, `stop_child`,
`start_child`, `restart_child`, `pause_child`, `resume_child`, `shutdown`,
`add_child`, `remove_child` — each taking `now` and returning the actions the
runtime must carry out (`Start`, `Stop`, `Pause`, `Resume`, `SetTimer`) plus
facts for the event log (`Note`) and the tree-level outcomes (`TreeReady`,
`TreeFailed`, `TreeStopped`). The runtime executes actions and feeds results
back in; nothing here touches a process.

Every supervisor works one operation at a time, like OTP's supervisor
process does: it first drains its queue of pending stops (always queued in
reverse start order), then *reconciles* — starts the first child, in start
order, that should be up and is not. That single rule yields one_for_one
(restart just the failed child), one_for_all (stop the others in reverse,
then start all in order) and rest_for_one (the same for the failed child and
those after it), and lets ctl commands and concurrent failures compose.

Each child has one `state` (down, up, or busy on the way: starting, stopping,
backoff) and one `goal` (what its supervisor wants of it: running, stopped by
ctl, ended, dropped, removed). The steps are named as in OTP's supervisor.erl:
`_init_children`, `_start_children`, `_do_start_child`, `_child_exited` (the
EXIT), `_do_restart` (by restart type, `should_restart`), `_restart` (intensity,
`_add_restart`, then the strategy's group), `_terminate_children`,
`_do_terminate`, `_stop_finished`, `_del_child`, `_do_auto_shutdown`. Other
modules read the tree through `TreeView` (`Tree.view`), never its dicts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import msgspec

from .spec import AgentSpec, RestartType, Strategy, SupervisorSpec


class Policy(NamedTuple):
    """How the tree treats one agent: what the runtime's spec says, nothing more."""

    restart: RestartType
    restart_delay: float = 0.0
    significant: bool = False  # its normal end may end its supervisor (auto_shutdown)
    group: str | None = None  # a pool's name: its members start together, not in turn

    @classmethod
    def of(cls, agent: AgentSpec) -> Policy:
        return cls(agent.restart, agent.restart_delay, agent.significant, agent.pool)


#: Where a child is: down (stopped, failed), up (running, paused), or busy on the way
#: (starting, stopping, backoff: waiting out restart_delay). One state at a time.
ChildState = Literal["stopped", "starting", "running", "paused", "stopping", "backoff", "failed"]
#: What its supervisor wants of it. running: keep it up (restart it as its type says);
#: stopped: ctl stop, down until ctl start; ended: it ended by itself and is not restarted
#: (auto_shutdown counts these); dropped: a temporary child a group restart stopped (OTP
#: deletes it); removed: reload or terminate, forgotten once down.
Goal = Literal["running", "stopped", "ended", "dropped", "removed"]
#: How its next start counts: fresh (the first, ctl start), restart (after a failure:
#: restart_delay first), waited (a restart whose delay is over).
NextStart = Literal["fresh", "restart", "waited"]
Phase = Literal["idle", "starting", "running", "stopping", "failing", "failed"]

_UP = frozenset({"starting", "running", "paused", "backoff"})


# --- outputs -----------------------------------------------------------------


class Start(msgspec.Struct, frozen=True, tag=True):
    """Spawn agent `name` and report `started` (ready) or `exited`."""

    name: str
    incarnation: int


class Stop(msgspec.Struct, frozen=True, tag=True):
    """Stop agent `name` (stop signal, grace, SIGKILL) and report `exited`."""

    name: str


class Pause(msgspec.Struct, frozen=True, tag=True):
    """Freeze agent `name` (cgroup.freeze, or SIGSTOP): it stays up, frozen."""

    name: str


class Resume(msgspec.Struct, frozen=True, tag=True):
    """Thaw agent `name`."""

    name: str


class SetTimer(msgspec.Struct, frozen=True, tag=True):
    """Call `timer(key)` after `delay` seconds."""

    key: str
    delay: float


class Note(msgspec.Struct, frozen=True, tag=True):
    """A fact for the event log: agent.restarting, supervisor.gave_up, ..."""

    event: str
    name: str
    detail: dict[str, object] = {}


class TreeReady(msgspec.Struct, frozen=True, tag=True):
    """Every child of the root has started."""


class TreeFailed(msgspec.Struct, frozen=True, tag=True):
    """The root supervisor gave up; every child is already stopped."""

    reason: str


class TreeStopped(msgspec.Struct, frozen=True, tag=True):
    """An orderly shutdown finished; every child is stopped."""


Action = Start | Stop | Pause | Resume | SetTimer | Note | TreeReady | TreeFailed | TreeStopped


# --- decisions -----------------------------------------------------------------


def should_restart(restart: RestartType, abnormal: bool) -> bool:
    """OTP's rule: permanent always, transient after an abnormal end, temporary never."""
    return restart == "permanent" or (restart == "transient" and abnormal)


# --- state -------------------------------------------------------------------


@dataclass(eq=False)
class Child:
    """One child of a supervisor: an agent instance or a nested supervisor.

    `state` and `goal` are properties: setting either keeps its supervisor's index
    (`Supervisor.up`, `Supervisor.waiting`) current, so that no decision has to scan
    a supervisor's children (ten thousand, for a large pool or a dynamic one).
    """

    name: str
    parent: str
    is_supervisor: bool
    restart: RestartType = "permanent"
    restart_delay: float = 0.0
    significant: bool = False
    group: str | None = None
    next_start: NextStart = "fresh"
    incarnation: int = -1  # bumped on every start; 0 is the first run
    timer_gen: int = 0
    # Restarts so far, by the reason of the exit each one followed (`exit_reason` at the
    # time): `ctl status` shows the sum, the metrics the breakdown (SPEC §13).
    restarts_by_reason: dict[str, int] = field(default_factory=dict)
    exit_reason: str = "stopped"  # of the last exit (ExitInfo.reason; "gave_up" for a supervisor)
    _state: ChildState = field(default="stopped", repr=False)
    _goal: Goal = field(default="running", repr=False)
    _supervisor: Supervisor | None = field(default=None, repr=False)  # its parent, in the tree

    @property
    def state(self) -> ChildState:
        return self._state

    @state.setter
    def state(self, value: ChildState) -> None:
        self._state = value
        if self._supervisor is not None:
            self._supervisor.track(self)

    @property
    def goal(self) -> Goal:
        return self._goal

    @goal.setter
    def goal(self, value: Goal) -> None:
        self._goal = value
        if self._supervisor is not None:
            self._supervisor.track(self)

    @property
    def restarts(self) -> int:
        return sum(self.restarts_by_reason.values())

    @property
    def down(self) -> bool:
        return self._state in ("stopped", "failed")

    def want(self, goal: Goal) -> None:
        """A new goal; a removed child stays removed (it is forgotten once down)."""
        if self._goal != "removed":
            self.goal = goal


@dataclass
class Operation:
    """What a supervisor is busy with: starting or stopping `names` (one child, or a
    pool's members together), or waiting out one child's restart_delay ("delay")."""

    kind: Literal["start", "stop", "delay"]
    names: set[str]


@dataclass
class Supervisor:
    """A supervisor's own state: its spec, restart history and work queue."""

    spec: SupervisorSpec
    phase: Phase = "idle"
    history: deque[float] = field(default_factory=deque)
    pending_stops: list[str] = field(default_factory=list)
    busy: Operation | None = None  # one at a time, as OTP's supervisor
    failure: str = ""
    # The index of its children (kept by Child.state/goal): those up (not stopped or
    # failed), those down that should run, and each one's place in the start order.
    up: set[str] = field(default_factory=set)
    waiting: set[str] = field(default_factory=set)
    position: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._number()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def children(self) -> tuple[str, ...]:
        return self.spec.children

    def track(self, child: Child) -> None:
        """`child`'s state or goal changed: its place in `up` and `waiting`."""
        name = child.name
        if child.down:
            self.up.discard(name)
            if child.goal == "running":
                self.waiting.add(name)
            else:
                self.waiting.discard(name)
        else:
            self.up.add(name)
            self.waiting.discard(name)

    def untrack(self, name: str) -> None:
        self.up.discard(name)
        self.waiting.discard(name)

    def first_waiting(self) -> str | None:
        """The child that starts next in the start order (None: none should start)."""
        if not self.waiting:
            return None
        return min(self.waiting, key=self.position.__getitem__)

    def in_order(self, names: set[str]) -> list[str]:
        return sorted(names, key=self.position.__getitem__)

    def set_spec(self, spec: SupervisorSpec) -> None:
        """New settings or a new child order (reload)."""
        self.spec = spec
        self._number()

    def insert(self, name: str, index: int | None) -> None:
        """A new child, last (a spawn: no renumbering) or at `index` (a reload)."""
        children = self.spec.children
        if index is None or index >= len(children):
            self.position[name] = self.position[children[-1]] + 1 if children else 0
            self.spec = msgspec.structs.replace(self.spec, children=(*children, name))
            return
        new = (*children[:index], name, *children[index:])
        self.set_spec(msgspec.structs.replace(self.spec, children=new))

    def drop(self, name: str) -> None:
        """A child forgotten: the others keep their places (the order is unchanged)."""
        children = self.spec.children
        i = children.index(name)
        self.spec = msgspec.structs.replace(self.spec, children=children[:i] + children[i + 1 :])
        self.position.pop(name, None)
        self.untrack(name)

    def _number(self) -> None:
        self.position = {c: i for i, c in enumerate(self.spec.children)}


class TreeError(Exception):
    """A command that does not fit the tree (unknown name, bad state)."""


class ChildView(NamedTuple):
    """One child as the other modules see it: a snapshot, nothing to change."""

    name: str
    parent: str
    is_supervisor: bool
    state: ChildState
    restart: RestartType
    incarnation: int
    restarts_by_reason: Mapping[str, int]  # the tree's own count: read, never written
    goal: Goal

    @property
    def restarts(self) -> int:
        return sum(self.restarts_by_reason.values())


class SupervisorView(NamedTuple):
    """One supervisor as the other modules see it."""

    name: str
    strategy: Strategy
    max_restarts: int
    max_seconds: float
    phase: Phase
    children: tuple[str, ...]


class TreeView:
    """The tree, read-only: what status, ctl, dynamic and the metrics may ask of it.

    Only the driver changes the tree (through its inputs); everyone else reads it
    here, so the tree's bookkeeping can change without them.
    """

    def __init__(self, tree: Tree) -> None:
        self._tree = tree

    @property
    def root(self) -> str:
        return self._tree.root

    def __contains__(self, name: object) -> bool:
        return name in self._tree.children

    def state(self, name: str) -> ChildState:
        return self._tree.state(name)

    def agents(self) -> list[str]:
        """Agent instance names in start order (depth first)."""
        return self._tree.agents()

    def supervisor_of(self, name: str) -> str:
        return self._tree.supervisor_of(name)

    def finished(self, name: str) -> bool:
        """Has `name` ended by itself for good (not to be restarted), and is it down?

        (OTP deletes such a child of a simple_one_for_one supervisor.)
        """
        c = self._tree._child(name)
        return c.goal == "ended" and c.down

    def child(self, name: str) -> ChildView:
        c = self._tree._child(name)
        return ChildView(
            c.name,
            c.parent,
            c.is_supervisor,
            c.state,
            c.restart,
            c.incarnation,
            c.restarts_by_reason,
            c.goal,
        )

    def supervisor(self, name: str) -> SupervisorView:
        try:
            sup = self._tree.sups[name]
        except KeyError:
            raise TreeError(f"unknown supervisor `{name}`") from None
        spec = sup.spec
        return SupervisorView(
            name, spec.strategy, spec.max_restarts, spec.max_seconds, sup.phase, spec.children
        )


class Tree:
    """The supervision state machine for one root supervisor and its subtree."""

    def __init__(
        self,
        supervisors: dict[str, SupervisorSpec],
        agents: dict[str, tuple[RestartType, float] | Policy],
        root: str = "root",
    ) -> None:
        """`agents` maps instance name to its Policy (or a (restart, delay) pair)."""
        self.root = root
        self.sups: dict[str, Supervisor] = {}
        self.children: dict[str, Child] = {}
        self._out: list[Action] = []
        self._shutting_down = False
        self._root_done = False
        self._now = 0.0
        self.view = TreeView(self)
        for spec in supervisors.values():
            self.sups[spec.name] = Supervisor(spec)
        for spec in supervisors.values():
            for name in spec.children:
                self._make_child(spec.name, name, supervisors, agents)

    def _make_child(
        self,
        parent: str,
        name: str,
        supervisors: dict[str, SupervisorSpec],
        agents: dict[str, tuple[RestartType, float] | Policy],
    ) -> None:
        if name in supervisors:
            spec = supervisors[name]
            child = Child(name, parent, True, restart=spec.restart, significant=spec.significant)
        else:
            policy = Policy(*agents[name])
            child = Child(name, parent, False, *policy)
            child.group = self._group(parent, policy)
        child._supervisor = self.sups[parent]
        child._supervisor.track(child)
        self.children[name] = child

    def _group(self, parent: str, policy: Policy) -> str | None:
        """A dynamic supervisor's children start together, as a pool's members do.

        They are independent of each other (simple_one_for_one): ordered start only
        makes a daemon that restores a thousand recorded children slow to be ready.
        """
        return parent if self.sups[parent].spec.strategy == "dynamic" else policy.group

    # --- queries ---------------------------------------------------------------

    def state(self, name: str) -> ChildState:
        return self._child(name).state

    def agents(self) -> list[str]:
        """Agent instance names in start order (depth first)."""
        out: list[str] = []

        def walk(sup: str) -> None:
            for name in self.sups[sup].children:
                if self.children[name].is_supervisor:
                    walk(name)
                else:
                    out.append(name)

        walk(self.root)
        return out

    def supervisor_of(self, name: str) -> str:
        return self._child(name).parent

    def _child(self, name: str) -> Child:
        try:
            return self.children[name]
        except KeyError:
            raise TreeError(f"unknown child `{name}`") from None

    # --- inputs ------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Start the whole tree, children in order."""
        self._tick(now)
        self._init_children(self.sups[self.root])
        return self._flush()

    def started(self, name: str, now: float, incarnation: int | None = None) -> list[Action]:
        """Agent `name` is ready (READY on the bus, or up for start_seconds)."""
        self._tick(now)
        child = self.children.get(name)
        if child is None or child.state != "starting":
            return self._flush()
        if incarnation is not None and incarnation != child.incarnation:
            return self._flush()
        self._child_started(child)
        return self._flush()

    def exited(
        self,
        name: str,
        now: float,
        *,
        abnormal: bool,
        reason: str = "exit",
        incarnation: int | None = None,
    ) -> list[Action]:
        """Agent `name`'s process is gone (crash, exit, or the stop we asked for)."""
        self._tick(now)
        child = self.children.get(name)
        if child is None or child.is_supervisor or child.state in ("stopped", "failed"):
            return self._flush()
        if incarnation is not None and incarnation != child.incarnation:
            return self._flush()
        self._child_exited(child, abnormal, reason)
        return self._flush()

    def timer(self, key: str, now: float) -> list[Action]:
        """A timer set with SetTimer fired."""
        self._tick(now)
        name, _, gen = key.rpartition("#")
        child = self.children.get(name)
        if child is not None and child.state == "backoff" and str(child.timer_gen) == gen:
            child.state = "stopped"
            if child.next_start == "restart":
                child.next_start = "waited"
            sup = self.sups[child.parent]
            self._finish(sup, "delay", name)
            self._advance(sup)
        return self._flush()

    def stop_child(self, name: str, now: float) -> list[Action]:
        """ctl stop: stop `name` and keep it down until start_child."""
        self._tick(now)
        child = self._child(name)
        child.want("stopped")
        self._terminate_children(self.sups[child.parent], [name])
        self._advance(self.sups[child.parent])
        return self._flush()

    def start_child(self, name: str, now: float) -> list[Action]:
        """ctl start: let `name` run again (also revives a finished temporary child)."""
        self._tick(now)
        child = self._child(name)
        child.want("running")
        child.next_start = "fresh"
        self._advance(self.sups[child.parent])
        return self._flush()

    def restart_child(self, name: str, now: float) -> list[Action]:
        """ctl restart / reload change: stop then start, not counted as a failure."""
        self._tick(now)
        child = self._child(name)
        child.want("running")
        self._terminate_children(self.sups[child.parent], [name])
        self._advance(self.sups[child.parent])
        return self._flush()

    def pause_child(self, name: str, now: float) -> list[Action]:
        """ctl pause: a running agent becomes paused (no-op in any other state).

        A paused agent is up: nothing starts it again, a stop (ctl, a group restart,
        the shutdown) stops it as usual, and its exit is handled as a running one's.
        """
        self._tick(now)
        child = self._child(name)
        if not child.is_supervisor and child.state == "running":
            child.state = "paused"
            self._out.append(Pause(name))
        return self._flush()

    def resume_child(self, name: str, now: float) -> list[Action]:
        """ctl resume: a paused agent runs again (no-op in any other state)."""
        self._tick(now)
        child = self._child(name)
        if child.state == "paused":
            child.state = "running"
            self._out.append(Resume(name))
        return self._flush()

    def shutdown(self, now: float) -> list[Action]:
        """Stop the whole tree in reverse start order, depth first."""
        self._tick(now)
        self._shutting_down = True
        root = self.sups[self.root]
        if root.phase in ("idle", "failed"):
            self._root_done = True
            self._out.append(TreeStopped())
            return self._flush()
        if root.phase != "failing":
            root.phase = "stopping"
        self._terminate_children(root, [c for c in reversed(root.children) if self._is_up(c)])
        self._advance(root)
        return self._flush()

    def abandon(self, now: float) -> list[Action]:
        """kill_all (a second stop signal, the shutdown timeout): every agent is being
        killed at once, so no supervisor restarts or starts anything any more.

        An orderly shutdown leaves a nested supervisor running until its turn, and it
        restarts a child that dies meanwhile, as OTP's does; under kill_all that would
        start an agent only to kill it. Each supervisor is stopping from now on, and ends
        once its children are down.
        """
        self._tick(now)
        self._shutting_down = True
        for sup in self.sups.values():
            if sup.phase in ("starting", "running"):
                sup.phase = "stopping"
        for sup in list(self.sups.values()):
            if sup.name in self.sups:
                self._advance(sup)
        return self._flush()

    def add_child(
        self,
        parent: str,
        name: str,
        now: float,
        *,
        agents: dict[str, tuple[RestartType, float] | Policy],
        supervisors: dict[str, SupervisorSpec] | None = None,
        index: int | None = None,
    ) -> list[Action]:
        """Reload/scale: add a child — an agent, or a supervisor and its subtree.

        `agents` has (restart, restart_delay) for every agent added;
        `supervisors` has the spec of every supervisor added (the child itself
        if it is one, and any nested below it).
        """
        self._tick(now)
        if name in self.children:
            raise TreeError(f"`{name}` already exists")
        supervisors = supervisors or {}
        sup = self.sups[parent]
        sup.insert(name, index)
        for spec in supervisors.values():
            self.sups[spec.name] = Supervisor(spec)
        self._make_child(parent, name, supervisors, agents)
        for spec in supervisors.values():
            for inner in spec.children:
                self._make_child(spec.name, inner, supervisors, agents)
        self._advance(sup)
        return self._flush()

    def remove_child(self, name: str, now: float) -> list[Action]:
        """Reload/scale: stop `name` (and its subtree) and forget it."""
        self._tick(now)
        child = self._child(name)
        child.goal = "removed"
        sup = self.sups[child.parent]
        self._terminate_children(sup, [name])
        self._advance(sup)
        return self._flush()

    def update_supervisor(self, spec: SupervisorSpec) -> None:
        """Reload: new settings and child order; children come and go via add/remove."""
        sup = self.sups[spec.name]
        current = list(sup.spec.children)
        ordered = [c for c in spec.children if c in current]
        ordered += [c for c in current if c not in spec.children]
        sup.set_spec(msgspec.structs.replace(spec, children=tuple(ordered)))
        if spec.name in self.children:
            self.children[spec.name].restart = spec.restart
            self.children[spec.name].significant = spec.significant

    def set_agent(self, name: str, policy: Policy) -> None:
        """Reload: an agent's restart type, delay and significance apply from its next exit."""
        child = self._child(name)
        child.restart, child.restart_delay, child.significant, _ = policy
        child.group = self._group(child.parent, policy)

    # --- the engine ----------------------------------------------------------------

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _tick(self, now: float) -> None:
        self._now = now

    def _is_up(self, name: str) -> bool:
        return self.children[name].state in _UP or self.children[name].state == "stopping"

    def _terminate_children(self, sup: Supervisor, names: list[str]) -> None:
        """Queue stops, keeping the queue in reverse start order."""
        if not names:
            return
        order = sup.position
        merged = set(sup.pending_stops) | set(names)
        sup.pending_stops = sorted(merged, key=lambda n: -order.get(n, -1))
        # Never wait for a start we are about to undo (it may never finish).
        op = sup.busy
        if op is not None and op.kind in ("start", "delay"):
            op.names -= merged
            if not op.names:
                sup.busy = None

    @staticmethod
    def _begin(sup: Supervisor, kind: Literal["start", "stop", "delay"], names: set[str]) -> None:
        """`sup` is busy with this now; a stop while stopping adds to it (a pool's members)."""
        op = sup.busy
        if op is not None and op.kind == kind == "stop":
            op.names |= names
        elif names:
            sup.busy = Operation(kind, set(names))

    @staticmethod
    def _finish(sup: Supervisor, kind: str, name: str) -> None:
        """`name`'s part of the operation is done (if it had one); once every part is,
        `sup` is free for the next."""
        op = sup.busy
        if op is not None and op.kind == kind and name in op.names:
            op.names.discard(name)
            if not op.names:
                sup.busy = None

    def _init_children(self, sup: Supervisor) -> None:
        """(Re)start `sup`: a fresh history; its children start in order as they should."""
        sup.phase = "starting"
        sup.history.clear()
        sup.pending_stops = []
        sup.busy = None
        sup.failure = ""
        for name in sup.children:
            child = self.children[name]
            ran = child.incarnation >= 0
            if sup.spec.strategy == "dynamic" and child.restart == "temporary" and ran:
                child.want("ended")  # a temporary child never runs again
            elif child.goal != "stopped":  # what ctl stopped stays down
                child.want("running")
        self._advance(sup)

    def _advance(self, sup: Supervisor) -> None:
        """Do the next operation of `sup`, if it is not busy."""
        while sup.busy is None:
            if sup.pending_stops:
                group = self.children[sup.pending_stops[0]].group
                if group is not None:
                    self._terminate_group(sup, group)
                    continue
                name = sup.pending_stops.pop(0)
                self._do_terminate(sup, self.children[name])
                continue
            if sup.phase in ("stopping", "failing"):
                if not sup.up:
                    self._shutdown_finished(sup)
                return
            if sup.phase not in ("starting", "running"):
                return
            first = sup.first_waiting()
            if first is None:
                if sup.phase == "starting":
                    sup.phase = "running"
                    self._supervisor_started(sup)
                return
            nxt = self.children[first]
            if nxt.group is not None and not self._needs_delay(nxt):
                self._start_children(sup, nxt.group)
            else:
                self._start_child(sup, nxt)

    def _do_terminate(self, sup: Supervisor, child: Child) -> None:
        """Stop one child (a nested supervisor: its children first, in reverse)."""
        if child.state == "backoff":
            child.state = "stopped"
            child.exit_reason = "stopped"  # its next start follows this stop, not the crash
            child.timer_gen += 1
            self._finish(sup, "delay", child.name)
            self._stop_finished(sup, child)
            return
        if child.state not in ("starting", "running", "paused"):
            if child.state != "stopping":
                self._stop_finished(sup, child)
            return
        child.state = "stopping"
        self._begin(sup, "stop", {child.name})
        if child.is_supervisor:
            inner = self.sups[child.name]
            inner.phase = "stopping"
            self._terminate_children(inner, [c for c in reversed(inner.children) if self._is_up(c)])
            self._advance(inner)
        else:
            self._out.append(Stop(child.name))

    def _terminate_group(self, sup: Supervisor, group: str) -> None:
        """Stop the queued members of pool `group` at the head of the queue, all at once.

        As they started: members are interchangeable, and stopping ten thousand in
        turn took minutes; the next configured child still waits for the whole pool.
        """
        members: list[str] = []
        while sup.pending_stops and self.children[sup.pending_stops[0]].group == group:
            members.append(sup.pending_stops.pop(0))
        for name in members:  # each stop under way joins the one operation
            self._do_terminate(sup, self.children[name])

    @staticmethod
    def _needs_delay(child: Child) -> bool:
        return child.next_start == "restart" and child.restart_delay > 0

    def _start_children(self, sup: Supervisor, group: str) -> None:
        """Start every member of pool `group` that should be up, all at once.

        Pool members are interchangeable, so waiting for each in turn only
        makes a large pool slow to start; the next configured child still
        waits until the whole pool is up.
        """
        waiting = (self.children[c] for c in sup.in_order(sup.waiting))
        members = [m for m in waiting if m.group == group and not self._needs_delay(m)]
        self._begin(sup, "start", {m.name for m in members})
        for member in members:
            self._do_start_child(member)

    def _start_child(self, sup: Supervisor, child: Child) -> None:
        """The next ordered start: after restart_delay (backoff) for a restart with one."""
        if self._needs_delay(child):
            child.state = "backoff"
            child.timer_gen += 1
            self._begin(sup, "delay", {child.name})
            self._out.append(SetTimer(f"{child.name}#{child.timer_gen}", child.restart_delay))
            return
        self._begin(sup, "start", {child.name})
        self._do_start_child(child)

    def _do_start_child(self, child: Child) -> None:
        """Hand one child to the runtime (or start a nested supervisor)."""
        if child.incarnation >= 0:
            by = child.restarts_by_reason
            by[child.exit_reason] = by.get(child.exit_reason, 0) + 1
        child.incarnation += 1
        child.state = "starting"
        if child.next_start != "fresh":
            self._out.append(Note("agent.restarting", child.name, {"restarts": child.restarts}))
        child.next_start = "fresh"
        if child.is_supervisor:
            self._init_children(self.sups[child.name])
        else:
            self._out.append(Start(child.name, child.incarnation))

    def _child_started(self, child: Child) -> None:
        child.state = "running"
        sup = self.sups[child.parent]
        self._finish(sup, "start", child.name)
        self._advance(sup)  # (nothing while the rest of a pool is still starting)

    def _stop_finished(self, sup: Supervisor, child: Child) -> None:
        """A child we stopped is down: forget it if it was removed."""
        if child.goal == "removed":
            sup.drop(child.name)
            self._del_child(child.name)

    def _del_child(self, name: str) -> None:
        """Forget `name` and, for a supervisor, its subtree."""
        child = self.children.pop(name)
        child._supervisor = None
        if child.is_supervisor:
            for inner in self.sups.pop(name).children:
                self._del_child(inner)

    def _child_exited(self, child: Child, abnormal: bool, reason: str) -> None:
        """An agent's (or nested supervisor's) end: OTP's handling of a child's EXIT."""
        sup = self.sups[child.parent]
        was = child.state
        child.state = "failed" if abnormal else "stopped"
        child.exit_reason = reason
        if was == "stopping":
            child.state = "stopped"
            self._finish(sup, "stop", child.name)
            self._stop_finished(sup, child)
            self._advance(sup)
            return
        if child.name in sup.pending_stops:
            # It died while queued to be stopped: the stop is done, not a new failure.
            sup.pending_stops.remove(child.name)
            self._stop_finished(sup, child)
            self._advance(sup)
            return
        self._finish(sup, "start", child.name)
        self._finish(sup, "stop", child.name)
        if was == "starting" and sup.phase == "starting" and sup.spec.strategy != "dynamic":
            # As in OTP's init: a child that cannot start fails its supervisor's start.
            # (A dynamic supervisor's children are not its init: the spawn fails instead.)
            self._terminate_supervisor(sup, f"child {child.name} failed to start ({reason})")
            return
        if sup.phase not in ("starting", "running"):
            self._advance(sup)
            return
        self._do_restart(sup, child, abnormal, reason)

    def _do_restart(self, sup: Supervisor, child: Child, abnormal: bool, reason: str) -> None:
        """OTP's do_restart: by its restart type and how it ended, restart it or let it end."""
        if should_restart(child.restart, abnormal):
            self._restart(sup, child, reason)
            return
        child.want("ended")
        if child.significant and self._auto_shutdown_due(sup):
            self._do_auto_shutdown(sup, child.name)
            return
        self._advance(sup)

    def _restart(self, sup: Supervisor, child: Child, reason: str) -> None:
        """OTP's restart: count it (too many and `sup` terminates), then restart by strategy."""
        if self._add_restart(sup):
            why = f"reached max restart intensity ({child.name}: {reason})"
            self._terminate_supervisor(sup, why)
            return
        child.next_start = "restart"
        affected = self._restart_group(sup, child.name)
        for name in affected:
            sibling = self.children[name]
            if sibling.restart == "temporary":
                if sibling.goal == "running":
                    sibling.goal = "dropped"
            elif sibling.goal not in ("stopped", "removed"):
                # OTP's restart_multiple_children: every kept child starts again, a
                # transient one that had already ended normally included.
                sibling.next_start = "restart"
                sibling.goal = "running"
        self._terminate_children(sup, [n for n in affected if self._is_up(n)])
        self._advance(sup)

    def _auto_shutdown_due(self, sup: Supervisor) -> bool:
        """OTP 24's auto_shutdown: has enough significant work ended by itself?"""
        mode = sup.spec.auto_shutdown
        if mode == "any_significant":
            return True
        if mode == "all_significant":
            significant = [self.children[c] for c in sup.children if self.children[c].significant]
            return all(c.goal == "ended" for c in significant)
        return False

    def _do_auto_shutdown(self, sup: Supervisor, last: str) -> None:
        """Stop the other children in reverse order; then `sup` ends normally."""
        sup.phase = "stopping"
        self._out.append(
            Note(
                "supervisor.auto_shutdown", sup.name, {"mode": sup.spec.auto_shutdown, "last": last}
            )
        )
        self._terminate_children(sup, [c for c in reversed(sup.children) if self._is_up(c)])
        self._advance(sup)

    def _restart_group(self, sup: Supervisor, failed: str) -> list[str]:
        """Siblings the strategy stops along with the failed child."""
        strategy: Strategy = sup.spec.strategy
        if strategy in ("one_for_one", "dynamic"):  # dynamic: OTP's simple_one_for_one
            return []
        children = list(sup.children)
        if strategy == "one_for_all":
            return [c for c in children if c != failed]
        return children[children.index(failed) + 1 :]

    def _add_restart(self, sup: Supervisor) -> bool:
        """Record a restart; true if it makes more than max_restarts in max_seconds."""
        now = self._now
        sup.history.append(now)
        while sup.history and now - sup.history[0] >= sup.spec.max_seconds:
            sup.history.popleft()
        return len(sup.history) > sup.spec.max_restarts

    def _terminate_supervisor(self, sup: Supervisor, reason: str) -> None:
        """Give up: stop every child in reverse order; then `sup` ends as failed."""
        sup.phase = "failing"
        sup.failure = reason
        self._out.append(Note("supervisor.gave_up", sup.name, {"reason": reason}))
        self._terminate_children(sup, [c for c in reversed(sup.children) if self._is_up(c)])
        self._advance(sup)

    def _shutdown_finished(self, sup: Supervisor) -> None:
        """`sup` has no child up: tell its parent (or the runtime, for the root)."""
        failing = sup.phase == "failing"
        sup.phase = "failed" if failing else "idle"
        if sup.name == self.root:
            if self._root_done:
                return
            self._root_done = True
            if failing and not self._shutting_down:
                self._out.append(TreeFailed(sup.failure))
            else:
                self._out.append(TreeStopped())
            return
        me = self.children[sup.name]
        if failing:
            self._child_exited(me, True, "gave_up")
        else:
            self._child_exited(me, False, "stopped")

    def _supervisor_started(self, sup: Supervisor) -> None:
        if sup.name == self.root:
            self._out.append(TreeReady())
            return
        self._child_started(self.children[sup.name])
