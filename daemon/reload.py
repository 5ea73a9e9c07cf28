"""What a reload changes: a pure diff between the running spec and the new one.

The driver applies the result to the tree in a fixed order — removals,
supervisor updates, additions, agent restarts — so that unchanged agents
keep their PIDs and everything else converges to the new config. `ctl scale`
is a reload too: of the running spec with one pool's size changed (`scaled`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from .spec import AgentSpec, PoolSpec, Spec, member_spec
from .tree import Policy


@dataclass
class Added:
    parent: str
    name: str
    index: int


@dataclass
class Plan:
    removed: list[str] = field(default_factory=list)  # top-most nodes to remove
    added: list[Added] = field(default_factory=list)  # top-most nodes to add, in order
    changed_agents: list[str] = field(default_factory=list)  # restart in place
    changed_supervisors: list[str] = field(default_factory=list)  # new settings, restart
    daemon_changed: bool = False

    @property
    def empty(self) -> bool:
        return not (self.removed or self.added or self.changed_agents or self.changed_supervisors)


def parents(spec: Spec) -> dict[str, str]:
    """child -> its supervisor, for every node but the root."""
    return {c: s.name for s in spec.supervisors.values() for c in s.children}


def diff(old: Spec, new: Spec) -> Plan:
    plan = Plan(daemon_changed=old.daemon != new.daemon)
    old_parent, new_parent = parents(old), parents(new)

    def kind(spec: Spec, name: str) -> str:
        return "supervisor" if name in spec.supervisors else "agent"

    gone = {
        n
        for n in old_parent
        if n not in new_parent or new_parent[n] != old_parent[n] or kind(old, n) != kind(new, n)
    }
    plan.removed = [n for n in _in_order(old) if n in gone and old_parent[n] not in gone]
    fresh = {
        n
        for n in new_parent
        if n not in old_parent or old_parent[n] != new_parent[n] or kind(old, n) != kind(new, n)
    }
    for name in _in_order(new):
        if name in fresh and new_parent[name] not in fresh:
            parent = new_parent[name]
            index = new.supervisors[parent].children.index(name)
            plan.added.append(Added(parent, name, index))
    removed_subtree = _descendants(old, gone)
    for name, spec in new.agents.items():
        if name in fresh or name in removed_subtree:
            continue
        if old.agents.get(name) != spec:
            plan.changed_agents.append(name)
    for name, spec in new.supervisors.items():
        if name in fresh or name in removed_subtree or name not in old.supervisors:
            continue
        before = old.supervisors[name]
        kept_old = [c for c in before.children if c in spec.children]
        kept_new = [c for c in spec.children if c in before.children]
        settings_changed = (
            before.strategy,
            before.max_restarts,
            before.max_seconds,
            before.restart,
        ) != (spec.strategy, spec.max_restarts, spec.max_seconds, spec.restart)
        if settings_changed or kept_old != kept_new:
            plan.changed_supervisors.append(name)
    return plan


def _in_order(spec: Spec) -> list[str]:
    """Every node, depth first in start order."""
    out: list[str] = []

    def walk(sup: str) -> None:
        for child in spec.supervisors[sup].children:
            out.append(child)
            if child in spec.supervisors:
                walk(child)

    walk(spec.root)
    return out


def _descendants(spec: Spec, roots: set[str]) -> set[str]:
    out: set[str] = set()
    stack = [r for r in roots if r in spec.supervisors]
    while stack:
        for child in spec.supervisors[stack.pop()].children:
            out.add(child)
            if child in spec.supervisors:
                stack.append(child)
    return out | roots


def subtree(spec: Spec, name: str) -> tuple[dict[str, Policy], dict]:
    """The agents' policies and supervisor specs under `name`, for add_child."""
    nodes = _descendants(spec, {name})
    agents = {n: Policy.of(spec.agents[n]) for n in nodes if n in spec.agents}
    supervisors = {n: spec.supervisors[n] for n in nodes if n in spec.supervisors}
    return agents, supervisors


def members(spec: Spec, pool: str) -> list[str]:
    """A pool's member instances, by index."""
    names = [n for n, a in spec.agents.items() if a.pool == pool]
    return sorted(names, key=lambda n: int(n.rpartition("@")[2]))


def scaled(spec: Spec, pool: str, count: int, template: AgentSpec) -> Spec:
    """`spec` with `count` members in `pool`: new ones shaped like `template`, placed
    after the last member; the highest-numbered go when it shrinks."""
    now = members(spec, pool)
    agents = dict(spec.agents)
    added = [member_spec(template, pool, index) for index in range(len(now), count)]
    removed = now[count:]
    for agent in added:
        agents[agent.name] = agent
    for name in removed:
        del agents[name]
    supervisor = spec.pools[pool].supervisor
    sup = spec.supervisors[supervisor]
    children = list(sup.children)
    anchor = children.index(now[-1]) + 1 if now else len(children)
    if removed:
        children = [c for c in children if c not in removed]
        anchor = min(anchor, len(children))
    children[anchor:anchor] = [a.name for a in added]
    supervisors = {
        **spec.supervisors,
        supervisor: msgspec.structs.replace(sup, children=tuple(children)),
    }
    pools = {**spec.pools, pool: PoolSpec(pool, count, supervisor)}
    return msgspec.structs.replace(spec, agents=agents, supervisors=supervisors, pools=pools)
