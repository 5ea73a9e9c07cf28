"""A tiny stand-in for the process runtime, to drive the pure tree in tests.

It carries out the tree's actions instantly (a Start is ready at once unless
told otherwise, a Stop ends the process at once) and records the order of
everything, which is what the tree tests assert on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentd.daemon.spec import RestartType, SupervisorSpec
from agentd.daemon.tree import (
    Action,
    Note,
    SetTimer,
    Start,
    Stop,
    Tree,
    TreeFailed,
    TreeReady,
    TreeStopped,
)


def sup(name: str, children: list[str], strategy: str = "one_for_one", **kw) -> SupervisorSpec:
    return SupervisorSpec(name=name, strategy=strategy, children=tuple(children), **kw)  # type: ignore[arg-type]


@dataclass
class Sim:
    tree: Tree
    now: float = 0.0
    auto_ready: bool = True
    log: list[tuple[str, str]] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)  # name -> pid
    timers: dict[str, float] = field(default_factory=dict)
    outcome: list[object] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    next_pid: int = 100

    @classmethod
    def make(
        cls,
        sups: list[SupervisorSpec],
        agents: dict[str, RestartType | tuple[RestartType, float]] | None = None,
        **kw,
    ) -> Sim:
        names = {c for s in sups for c in s.children} - {s.name for s in sups}
        table: dict[str, tuple[RestartType, float]] = {}
        for name in names:
            value = (agents or {}).get(name, "permanent")
            table[name] = value if isinstance(value, tuple) else (value, 0.0)
        return cls(Tree({s.name: s for s in sups}, table), **kw)

    def apply(self, actions: list[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Start):
                self.next_pid += 1
                self.running[action.name] = self.next_pid
                self.log.append(("start", action.name))
                if self.auto_ready:
                    queue += self.tree.started(action.name, self.now, action.incarnation)
            elif isinstance(action, Stop):
                self.log.append(("stop", action.name))
                self.running.pop(action.name, None)
                queue += self.tree.exited(action.name, self.now, abnormal=False, reason="stopped")
            elif isinstance(action, SetTimer):
                self.timers[action.key] = self.now + action.delay
            elif isinstance(action, Note):
                self.notes.append(action)
            elif isinstance(action, TreeReady | TreeFailed | TreeStopped):
                self.outcome.append(action)

    def start(self) -> Sim:
        self.apply(self.tree.start(self.now))
        return self

    def crash(self, name: str, abnormal: bool = True, reason: str = "exit") -> None:
        self.log.append(("crash", name))
        self.running.pop(name, None)
        self.apply(self.tree.exited(name, self.now, abnormal=abnormal, reason=reason))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for key, due in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if due <= self.now:
                del self.timers[key]
                self.apply(self.tree.timer(key, self.now))

    def clear(self) -> None:
        self.log.clear()

    def ops(self, kind: str) -> list[str]:
        return [name for op, name in self.log if op == kind]
