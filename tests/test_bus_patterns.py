"""The subscription trie: exact semantics, checked against a reference matcher."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.bus.patterns import Trie, valid


def reference(pattern: str, type_: str) -> bool:
    """Straight from the definition: `*` one segment, `**` zero or more."""

    def go(p: list[str], t: list[str]) -> bool:
        if not p:
            return not t
        if p[0] == "**":
            return any(go(p[1:], t[i:]) for i in range(len(t) + 1))
        if not t:
            return False
        return (p[0] == "*" or p[0] == t[0]) and go(p[1:], t[1:])

    return go(pattern.split("."), type_.split("."))


def test_examples() -> None:
    t = Trie()
    for p in ("doc.*", "doc.**", "doc.created", "*.created", "**", "a.**.z"):
        t.add(p, p)
    assert t.match("doc.created") == {"doc.*", "doc.**", "doc.created", "*.created", "**"}
    assert t.match("doc") == {"doc.**", "**"}
    assert t.match("doc.a.b") == {"doc.**", "**"}
    assert t.match("a.z") == {"a.**.z", "**"}
    assert t.match("a.b.c.z") == {"a.**.z", "**"}
    assert t.match("a.b.c") == {"**"}


def test_remove_prunes() -> None:
    t = Trie()
    t.add("x.y.z", "s")
    t.add("x.*", "s")
    t.remove_subscriber("s")
    assert t.match("x.y.z") == set() and t.root.children == {}


def test_valid() -> None:
    assert valid("a.b") and valid("**") and not valid("") and not valid("a..b")


segment = st.sampled_from(["a", "b", "c", "*", "**"])
word = st.sampled_from(["a", "b", "c"])


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(segment, min_size=1, max_size=4), min_size=1, max_size=6),
    st.lists(word, min_size=1, max_size=5),
)
def test_trie_agrees_with_reference(patterns, type_parts) -> None:
    t = Trie()
    names = [".".join(p) for p in patterns]
    for name in names:
        t.add(name, name)
    type_ = ".".join(type_parts)
    assert t.match(type_) == {n for n in names if reference(n, type_)}


def _count_nodes_visited(trie: Trie, type_: str) -> int:
    visited = 0
    stack = [(trie.root, 0)]
    segments = type_.split(".")
    while stack:
        node, i = stack.pop()
        visited += 1
        if i < len(segments):
            for key in (segments[i], "*"):
                if key in node.children:
                    stack.append((node.children[key], i + 1))
    return visited


def test_ten_thousand_subscriptions_do_not_widen_the_walk() -> None:
    t = Trie()
    for i in range(10_000):
        t.add(f"svc{i}.event.*", f"agent{i}")
    t.add("svc42.event.created", "exact")
    assert t.match("svc42.event.created") == {"agent42", "exact"}
    # The walk touches a handful of nodes, not 10,000 patterns.
    assert _count_nodes_visited(t, "svc42.event.created") < 10
