"""Subscription patterns in a trie over dot-separated segments.

`*` matches exactly one segment, `**` zero or more, anything else itself.
Matching walks the trie with the signal type's segments, so its cost depends
on the type's length and the wildcards along the way — not on how many
subscriptions exist. 10,000 subscriptions route as fast as ten.
"""

from __future__ import annotations


class _Node:
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: set[str] = set()


def valid(pattern: str) -> bool:
    """Non-empty segments only ("a..b", ".a" and "" are not patterns)."""
    return bool(pattern) and all(pattern.split("."))


class Trie:
    """pattern → subscriber names; `match(type)` gives every subscriber whose pattern fits."""

    def __init__(self) -> None:
        self.root = _Node()
        self.by_subscriber: dict[str, set[str]] = {}

    def add(self, pattern: str, subscriber: str) -> None:
        node = self.root
        for segment in pattern.split("."):
            node = node.children.setdefault(segment, _Node())
        node.subscribers.add(subscriber)
        self.by_subscriber.setdefault(subscriber, set()).add(pattern)

    def remove(self, pattern: str, subscriber: str) -> None:
        path = [self.root]
        for segment in pattern.split("."):
            child = path[-1].children.get(segment)
            if child is None:
                return
            path.append(child)
        path[-1].subscribers.discard(subscriber)
        segments = pattern.split(".")
        for depth in range(len(segments), 0, -1):  # prune empty branches
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[segments[depth - 1]]
        patterns = self.by_subscriber.get(subscriber)
        if patterns is not None:
            patterns.discard(pattern)
            if not patterns:
                del self.by_subscriber[subscriber]

    def remove_subscriber(self, subscriber: str) -> None:
        for pattern in list(self.by_subscriber.get(subscriber, ())):
            self.remove(pattern, subscriber)

    def patterns(self, subscriber: str) -> set[str]:
        return set(self.by_subscriber.get(subscriber, ()))

    def match(self, type_: str) -> set[str]:
        out: set[str] = set()
        _walk(self.root, type_.split("."), 0, out)
        return out


def _walk(node: _Node, segments: list[str], i: int, out: set[str]) -> None:
    deep = node.children.get("**")
    if deep is not None:
        # `**` swallows zero or more segments: try every suffix.
        for j in range(i, len(segments) + 1):
            _walk(deep, segments, j, out)
    if i == len(segments):
        out.update(node.subscribers)
        return
    exact = node.children.get(segments[i])
    if exact is not None:
        _walk(exact, segments, i + 1, out)
    star = node.children.get("*")
    if star is not None:
        _walk(star, segments, i + 1, out)


def matches(pattern: str, type_: str) -> bool:
    """One pattern against one type (the SDK routes its few handlers with this)."""
    trie = Trie()
    trie.add(pattern, "x")
    return bool(trie.match(type_))
