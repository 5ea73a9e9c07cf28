"""A trace's records as a causal tree, for `agentd ctl trace` (pure: records in, text out).

The edges are `causation_id`: a signal sits under the one that was being
handled when it was sent, so a request's reply sits under the request. A
reply from a peer that sets no `causation_id` is placed under the request
with its `correlation_id`. A record whose cause is not in the trace (it
fell out of the broker's ring, or came from outside) is a root.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .envelope import TraceRecord
from .traces import ROUTED


@dataclass
class Node:
    record: TraceRecord
    children: list[Node] = field(default_factory=list)


def build(records: Iterable[TraceRecord]) -> list[Node]:
    """The roots of the causal tree, each node's children in time order."""
    ordered = sorted(records, key=lambda r: (r.time, r.id))
    nodes = {r.id: Node(r) for r in ordered}
    requests = {
        r.correlation_id: r.id for r in ordered if r.correlation_id is not None and not r.reply
    }
    parent: dict[str, str] = {}
    for r in ordered:
        cause = r.causation_id
        if cause is None and r.reply and r.correlation_id is not None:
            cause = requests.get(r.correlation_id)
        if cause is not None and cause != r.id and cause in nodes:
            parent[r.id] = cause
    for r in ordered:
        if r.id in parent:
            nodes[parent[r.id]].children.append(nodes[r.id])
    roots = [nodes[r.id] for r in ordered if r.id not in parent]
    # A cycle of causes (only a confused peer makes one) has no root: cut it at its oldest.
    seen = _reachable(roots)
    for r in ordered:
        if r.id not in seen:
            cut = nodes[r.id]
            nodes[parent[r.id]].children.remove(cut)
            roots.append(cut)
            seen |= _reachable([cut])
    return roots


def _reachable(roots: list[Node]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.record.id not in seen:
            seen.add(node.record.id)
            stack.extend(node.children)
    return seen


def _walk(roots: list[Node]) -> Iterable[tuple[Node, str, str]]:
    """(node, the prefix of its line, the prefix of its children's lines), depth first."""
    stack = [(root, "", "") for root in reversed(roots)]
    while stack:
        node, head, inner = stack.pop()
        yield node, head, inner
        kids = node.children
        for i in range(len(kids) - 1, -1, -1):
            last = i == len(kids) - 1
            branch, below = ("└── ", "    ") if last else ("├── ", "│   ")
            stack.append((kids[i], inner + branch, inner + below))


def recipients(r: TraceRecord) -> str:
    """Who it was for: the agent, pool (and member), client, or a publication's subscribers."""
    if r.to is None:
        return ", ".join(sorted(r.outcomes)) if r.outcomes else "(no subscriber)"
    return f"{r.to} ({r.member})" if r.member else r.to


def outcome(r: TraceRecord) -> str:
    """What became of it, as far as the broker knows."""
    if r.to is None and r.outcomes:
        text = ", ".join(f"{name} {what}" for name, what in sorted(r.outcomes.items()))
    elif r.to is None and r.outcome == ROUTED:
        text = "nobody subscribed"
    else:
        text = r.outcome
    if r.deliveries > 1:
        text += f" ({r.deliveries} deliveries)"
    if r.error:
        text += f": {' '.join(r.error.split())}"
    return text


def clock(t: float) -> str:
    """Local time of day, to the millisecond."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def render(records: list[TraceRecord], mark: str | None = None) -> list[str]:
    """The tree as lines: `type  source → recipients  time  outcome`; `mark`'s line has ▶."""
    if not records:
        return []
    roots = build(records)
    first = min(r.time for r in records)
    tid = trace_id(records)
    day = time.strftime("%Y-%m-%d", time.localtime(first))
    n = len(records)
    lines = [f"trace {tid or '-'}: {n} signal{'' if n == 1 else 's'}, from {day} {clock(first)}"]
    for node, head, _ in _walk(roots):
        r = node.record
        flag = "▶ " if r.id == mark else "  "
        lines.append(
            f"{flag}{head}{r.type}  {r.source} → {recipients(r)}  {clock(r.time)}  {outcome(r)}"
        )
    return lines


def trace_id(records: list[TraceRecord]) -> str | None:
    for r in records:
        tp = r.traceparent
        if tp is not None and len(tp) >= 55:
            return tp[3:35]
    return None


def as_json(records: list[TraceRecord], mark: str | None = None) -> dict[str, Any]:
    """`ctl trace --json`: the records in time order, and the tree in the text's line order.

    The tree is flat — `{"id", "parent", "depth"}` per line — so a long chain of
    causes is as easy to print and to read as a short one.
    """
    parents: dict[str, str | None] = {}
    tree = []
    for node, head, _ in _walk(build(records)):
        for child in node.children:
            parents[child.record.id] = node.record.id
        rid = node.record.id
        tree.append({"id": rid, "parent": parents.get(rid), "depth": len(head) // 4})
    ordered = sorted(records, key=lambda r: (r.time, r.id))
    return {
        "trace_id": trace_id(records),
        "id": mark,
        "records": [{f: getattr(r, f) for f in r.__struct_fields__} for r in ordered],
        "tree": tree,
    }
