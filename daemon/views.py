"""What `ctl status`, `ctl tree` and the metrics show: pure functions of the state.

Each takes what the daemon holds (the tree's read-only view, the runtime's
processes and last exits, the broker's figures) and returns rows or a tree of
plain dicts. Nothing here reads /proc or asks the broker: the daemon does that
once per command (service.py) and passes the results in.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .spec import Spec, SupervisorSpec
from .tree import TreeView

if TYPE_CHECKING:
    from agentd.bus.envelope import Stats

    from .runtime import ExitInfo, Proc

BUS = "bus"


class AgentNow(NamedTuple):
    """One agent (or the broker) as `ctl status` and the metrics both report it."""

    name: str
    state: str
    supervisor: str | None
    restarts: Mapping[str, int]  # by reason (the tree's, or the broker supervisor's, own count)
    proc: Proc | None  # its live process, if any
    last_exit: ExitInfo | None


def agents_now(
    tree: TreeView,
    procs: Mapping[str, Proc],
    last_exit: Mapping[str, ExitInfo],
    broker: AgentNow | None = None,
) -> Iterator[AgentNow]:
    """Every agent in start order, then the broker (`bus`): the rows of status and metrics."""
    for name in tree.agents():
        child = tree.child(name)
        proc = procs.get(name)
        yield AgentNow(
            name, child.state, child.parent, child.restarts_by_reason, proc, last_exit.get(name)
        )
    if broker is not None:  # supervised by the daemon, outside the user's tree
        yield broker


def broker_now(
    proc: Proc | None, restarts: Mapping[str, int], last_exit: ExitInfo | None
) -> AgentNow:
    """The broker's row: running while it has a process."""
    state = "running" if proc is not None else "stopped"
    return AgentNow(BUS, state, None, restarts, proc, last_exit)


def live(proc: Proc | None) -> Proc | None:
    """`proc` if it is a running process (started, not reaped), else None."""
    return proc if proc is not None and bool(proc.pid) and not proc.exited else None


def status_row(
    a: AgentNow, now: float, stats: Stats | None, rss: int | None, cpu: float | None
) -> dict[str, Any]:
    """One `ctl status --json` row; `rss` and `cpu` from the caller's /proc pass."""
    proc = live(a.proc)
    last = a.last_exit
    held, in_flight = bus_figures(a.name, stats)
    return {
        "name": a.name,
        "state": a.state,
        "pid": proc.pid if proc else None,
        "uptime": round(now - proc.started_at, 3) if proc else None,
        "restarts": sum(a.restarts.values()),
        "supervisor": a.supervisor,
        "last_exit": None
        if last is None
        else {
            "code": last.code,
            "signal": signal.Signals(last.signal).name if last.signal else None,
            "reason": last.reason,
        },
        "rss": rss,
        "cpu": cpu,
        "held": held,
        "in_flight": in_flight,
    }


def bus_figures(name: str, stats: Stats | None) -> tuple[int | None, int | None]:
    """(held, in_flight) of one status row; None, None if the broker did not answer.

    held: what the broker keeps for the agent and has not handed over (its hold
    queue, and for ack = true its mailbox's pending signals). The broker's own row
    (`bus`) has the totals, which include what waits for a pool as a whole.
    """
    if stats is None:
        return None, None
    if name == BUS:
        c = stats.counters
        return c.get("held_now", 0) + c.get("pending_now", 0), c.get("in_flight_now", 0)
    figures = stats.agents.get(name)
    if figures is None:
        return 0, 0
    return figures.held + figures.pending, figures.in_flight


def tree_view(
    tree: TreeView, procs: Mapping[str, Proc], supervisors: Mapping[str, SupervisorSpec]
) -> dict[str, Any]:
    """The supervision tree with strategies and states, for `ctl tree`.

    `supervisors`: the running spec's, for what a dynamic supervisor adds (its template).
    """

    def node(name: str) -> dict[str, Any]:
        sup = tree.supervisor(name)
        children = []
        for child_name in sup.children:
            child = tree.child(child_name)
            if child.is_supervisor:
                children.append(node(child_name))
            else:
                proc = procs.get(child_name)
                children.append(
                    {
                        "name": child_name,
                        "type": "agent",
                        "state": child.state,
                        "restart": child.restart,
                        "pid": proc.pid if proc and proc.pid else None,
                    }
                )
        dynamic = supervisors.get(name)
        extra = {}
        if dynamic is not None and dynamic.strategy == "dynamic":
            extra = {"template": dynamic.template, "max_children": dynamic.max_children}
        return {
            **extra,
            "name": name,
            "type": "supervisor",
            "strategy": sup.strategy,
            "max_restarts": sup.max_restarts,
            "max_seconds": sup.max_seconds,
            "state": sup.phase,
            "children": children,
        }

    return node(tree.root)


def isolation_info(spec: Spec, cgroups: Any, reason: str) -> dict[str, Any]:
    """The isolation in force: the `daemon.isolation` line and `status --json`'s field.

    `unenforced`: limits some agent sets that nothing enforces here (pids and
    cpu_percent need their cgroup controller); `sampled`: memory limits checked by
    the RSS sampler instead of the kernel.
    """
    from .cgroup import LIMIT_CONTROLLER

    used = {
        key
        for agent in spec.agents.values()
        for key in LIMIT_CONTROLLER
        if getattr(agent.limits, key)
    }
    if cgroups is None:
        return {
            "mode": "process_group",
            "reason": reason,
            "unenforced": sorted(used - {"memory_mb"}),
            "sampled": sorted(used & {"memory_mb"}),
        }
    served = cgroups.controllers
    missing = sorted(key for key in used if LIMIT_CONTROLLER[key] not in served)
    return {
        "mode": "cgroup",
        "layout": cgroups.layout.kind,
        "subtree": cgroups.main,
        "how": cgroups.how,
        "controllers": served,
        "unenforced": [key for key in missing if key != "memory_mb"],
        "sampled": [key for key in missing if key == "memory_mb"],
    }
