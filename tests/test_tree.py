"""Unit and property tests for the pure supervision state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.daemon.tree import (
    Pause,
    Resume,
    SetTimer,
    Start,
    Stop,
    TreeFailed,
    TreeReady,
    TreeStopped,
)
from tests.fake_runtime import Sim, sup

ABC = ["a", "b", "c", "d"]


def test_ordered_start_and_ready() -> None:
    sim = Sim.make([sup("root", ABC)]).start()
    assert sim.ops("start") == ABC
    assert sim.outcome == [TreeReady()]


def test_start_waits_for_ready_before_next_child() -> None:
    sim = Sim.make([sup("root", ["a", "b"])], auto_ready=False)
    actions = sim.tree.start(0.0)
    assert actions == [Start("a", 0)]
    assert sim.tree.started("a", 0.0, 0) == [Start("b", 0)]
    assert sim.tree.started("b", 0.0, 0) == [TreeReady()]


@pytest.mark.parametrize(
    ("strategy", "stopped", "started"),
    [
        ("one_for_one", [], ["b"]),
        ("one_for_all", ["d", "c", "a"], ["a", "b", "c", "d"]),
        ("rest_for_one", ["d", "c"], ["b", "c", "d"]),
    ],
)
def test_strategies(strategy: str, stopped: list[str], started: list[str]) -> None:
    sim = Sim.make([sup("root", ABC, strategy)]).start()
    sim.clear()
    sim.crash("b")
    assert sim.ops("stop") == stopped
    assert sim.ops("start") == started
    assert all(sim.tree.state(n) == "running" for n in ABC)


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
@pytest.mark.parametrize(
    ("restart", "abnormal", "restarted"),
    [
        ("permanent", False, True),
        ("permanent", True, True),
        ("transient", False, False),
        ("transient", True, True),
        ("temporary", False, False),
        ("temporary", True, False),
    ],
)
def test_restart_types(strategy: str, restart: str, abnormal: bool, restarted: bool) -> None:
    sim = Sim.make([sup("root", ["x", "y", "z"], strategy)], {"y": restart}).start()
    sim.clear()
    sim.crash("y", abnormal=abnormal)
    assert ("y" in sim.ops("start")) is restarted
    if not restarted:
        # A child that is not restarted does not trigger the strategy either.
        assert sim.ops("stop") == []
        assert sim.tree.state("y") == ("failed" if abnormal else "stopped")


def test_temporary_sibling_not_restarted_by_one_for_all() -> None:
    sim = Sim.make([sup("root", ["a", "t", "c"], "one_for_all")], {"t": "temporary"}).start()
    sim.clear()
    sim.crash("c")
    assert sim.ops("stop") == ["t", "a"]
    assert sim.ops("start") == ["a", "c"]
    assert sim.tree.state("t") == "stopped"


def test_transient_sibling_restarted_by_one_for_all() -> None:
    sim = Sim.make([sup("root", ["a", "t", "c"], "one_for_all")], {"t": "transient"}).start()
    sim.clear()
    sim.crash("c")
    assert sim.ops("start") == ["a", "t", "c"]


@pytest.mark.parametrize(
    ("strategy", "crashed", "restarted"),
    [("one_for_all", "c", ["a", "t", "c"]), ("rest_for_one", "a", ["a", "t", "c"])],
)
def test_group_restart_starts_a_transient_child_that_had_ended_normally(
    strategy: str, crashed: str, restarted: list[str]
) -> None:
    """OTP's restart_multiple_children: every kept child of the group starts again."""
    sim = Sim.make([sup("root", ["a", "t", "c"], strategy)], {"t": "transient"}).start()
    sim.crash("t", abnormal=False)
    assert sim.tree.state("t") == "stopped"
    sim.clear()
    sim.crash(crashed)
    assert sim.ops("start") == restarted
    assert sim.tree.state("t") == "running"


def test_group_restart_leaves_a_held_child_down() -> None:
    sim = Sim.make([sup("root", ["a", "t", "c"], "one_for_all")], {"t": "transient"}).start()
    sim.apply(sim.tree.stop_child("t", sim.now))
    sim.clear()
    sim.crash("c")
    assert sim.ops("start") == ["a", "c"]
    assert sim.tree.state("t") == "stopped"


@pytest.mark.parametrize("restart", ["transient", "temporary"])
def test_auto_shutdown_any_significant_at_the_root(restart: str) -> None:
    root = sup("root", ["a", "main", "c"], auto_shutdown="any_significant")
    sim = Sim.make([root], {"main": (restart, 0.0, True)}).start()
    sim.clear()
    sim.crash("main", abnormal=False)
    assert sim.ops("stop") == ["c", "a"]
    assert sim.outcome[-1] == TreeStopped()
    assert [n.event for n in sim.notes] == ["supervisor.auto_shutdown"]


def test_auto_shutdown_waits_for_all_significant() -> None:
    root = sup("root", ["a", "j1", "j2"], auto_shutdown="all_significant")
    table = {"j1": ("transient", 0.0, True), "j2": ("transient", 0.0, True)}
    sim = Sim.make([root], table).start()
    sim.crash("j1", abnormal=False)
    assert sim.outcome == [TreeReady()]
    sim.crash("j1", abnormal=True)  # not running: a stale report changes nothing
    sim.clear()
    sim.crash("j2", abnormal=False)
    assert sim.ops("stop") == ["a"]
    assert sim.outcome[-1] == TreeStopped()


def test_a_crashing_significant_transient_child_is_restarted_not_shut_down() -> None:
    root = sup("root", ["a", "main"], auto_shutdown="any_significant")
    sim = Sim.make([root], {"main": ("transient", 0.0, True)}).start()
    sim.clear()
    sim.crash("main", abnormal=True)
    assert sim.ops("start") == ["main"]
    assert sim.outcome == [TreeReady()]


def test_auto_shutdown_never_ignores_significance() -> None:
    sim = Sim.make([sup("root", ["a", "main"])], {"main": ("transient", 0.0, True)}).start()
    sim.crash("main", abnormal=False)
    assert sim.outcome == [TreeReady()]
    assert sim.tree.state("a") == "running"


def test_nested_auto_shutdown_ends_the_supervisor_normally() -> None:
    """A significant transient supervisor that shuts itself down ends its parent too."""
    inner = sup(
        "job",
        ["step", "main"],
        auto_shutdown="any_significant",
        restart="transient",
        significant=True,
    )
    root = sup("root", ["web", "job"], auto_shutdown="any_significant")
    sim = Sim.make([root, inner], {"main": ("transient", 0.0, True)}).start()
    sim.clear()
    sim.crash("main", abnormal=False)
    assert sim.ops("stop") == ["step", "web"]
    assert sim.outcome[-1] == TreeStopped()


def test_nested_auto_shutdown_of_a_permanent_supervisor_restarts_it() -> None:
    inner = sup("job", ["step", "main"], auto_shutdown="any_significant")
    sim = Sim.make([sup("root", ["web", "job"]), inner], {"main": ("transient", 0.0, True)})
    sim.start()
    sim.clear()
    sim.crash("main", abnormal=False)
    assert sim.ops("stop") == ["step"]
    assert sim.ops("start") == ["step", "main"]
    assert sim.tree.state("web") == "running"


POOL = {f"p@{i}": ("permanent", 0.0, False, "p") for i in range(3)}


def test_pool_members_start_together_between_ordered_children() -> None:
    sim = Sim.make([sup("root", ["a", *POOL, "c"])], POOL, auto_ready=False)
    assert sim.tree.start(0.0) == [Start("a", 0)]
    assert sim.tree.started("a", 0.0, 0) == [Start(n, 0) for n in POOL]
    assert sim.tree.started("p@1", 0.0, 0) == []
    assert sim.tree.started("p@0", 0.0, 0) == []
    assert sim.tree.started("p@2", 0.0, 0) == [Start("c", 0)]
    assert sim.tree.started("c", 0.0, 0) == [TreeReady()]


@pytest.mark.parametrize("last", POOL)
def test_a_pool_stops_together_and_the_next_child_waits_for_all_of_it(last: str) -> None:
    sim = Sim.make([sup("root", ["a", *POOL])], POOL).start()
    assert sim.tree.shutdown(1.0) == [Stop(n) for n in reversed(POOL)]
    for name in [n for n in POOL if n != last]:
        assert sim.tree.exited(name, 1.0, abnormal=False) == []  # `last` is still stopping
    assert sim.tree.exited(last, 1.0, abnormal=False) == [Stop("a")]


def test_a_pool_member_that_cannot_start_fails_the_start() -> None:
    sim = Sim.make([sup("root", ["a", *POOL])], POOL, auto_ready=False)
    sim.apply(sim.tree.start(0.0))
    sim.apply(sim.tree.started("a", 0.0, 0))
    sim.apply(sim.tree.started("p@0", 0.0, 0))
    sim.apply(sim.tree.exited("p@1", 0.0, abnormal=True, incarnation=0))
    assert sim.ops("stop") == ["p@2", "p@0", "a"]
    assert isinstance(sim.outcome[-1], TreeFailed)


def test_one_pool_member_restarts_alone() -> None:
    sim = Sim.make([sup("root", ["a", *POOL])], POOL).start()
    sim.clear()
    sim.crash("p@1")
    assert sim.ops("start") == ["p@1"]
    assert sim.ops("stop") == []


def test_one_for_all_restarts_the_pool_together() -> None:
    sim = Sim.make([sup("root", ["a", *POOL], "one_for_all")], POOL, auto_ready=False)
    sim.apply(sim.tree.start(0.0))
    for name in ["a", *POOL]:
        sim.apply(sim.tree.started(name, 0.0))
    sim.clear()
    sim.crash("a")
    assert sim.ops("stop") == ["p@2", "p@1", "p@0"]
    assert sim.ops("start") == ["a"]
    sim.apply(sim.tree.started("a", 0.0))
    assert sim.ops("start") == ["a", *POOL]


def test_intensity_gives_up_and_stops_in_reverse() -> None:
    sim = Sim.make([sup("root", ABC, max_restarts=2, max_seconds=10)]).start()
    for _ in range(2):
        sim.now += 1
        sim.crash("b")
    assert sim.outcome == [TreeReady()]
    sim.clear()
    sim.now += 1
    sim.crash("b")
    assert sim.ops("stop") == ["d", "c", "a"]
    assert isinstance(sim.outcome[-1], TreeFailed)
    assert "intensity" in sim.outcome[-1].reason
    assert [n.event for n in sim.notes] == ["agent.restarting"] * 2 + ["supervisor.gave_up"]


def test_intensity_window_slides() -> None:
    sim = Sim.make([sup("root", ["a"], max_restarts=1, max_seconds=5)]).start()
    for _ in range(5):
        sim.now += 6  # each restart is alone in its window
        sim.crash("a")
    assert sim.outcome == [TreeReady()]
    assert sim.view.child("a").restarts == 5


def test_max_restarts_zero_gives_up_at_first_failure() -> None:
    sim = Sim.make([sup("root", ["a"], max_restarts=0)]).start()
    sim.crash("a")
    assert isinstance(sim.outcome[-1], TreeFailed)


def test_nested_supervisor_gives_up_and_parent_restarts_it() -> None:
    sim = Sim.make(
        [
            sup("root", ["front", "workers", "back"], "one_for_one", max_restarts=5),
            sup("workers", ["w1", "w2"], "one_for_all", max_restarts=1, max_seconds=10),
        ]
    ).start()
    assert sim.ops("start") == ["front", "w1", "w2", "back"]
    sim.crash("w1")
    sim.clear()
    sim.crash("w2")  # second restart in the window: workers gives up
    assert sim.ops("stop") == ["w1"]
    assert sim.ops("start") == ["w1", "w2"]  # the parent restarted the subtree
    assert [n.event for n in sim.notes][-2:] == ["supervisor.gave_up", "agent.restarting"]
    assert sim.notes[-1].name == "workers"
    assert sim.tree.state("workers") == "running"
    assert sim.tree.state("front") == sim.tree.state("back") == "running"
    sim.clear()
    sim.crash("w1")  # its restart gave workers a fresh history: one restart is allowed again
    assert sim.ops("stop") == ["w2"] and sim.ops("start") == ["w1", "w2"]
    assert sim.notes[-1].event == "agent.restarting" and sim.tree.state("workers") == "running"


def test_nested_rest_for_one_restarts_later_siblings_of_supervisor() -> None:
    sim = Sim.make(
        [
            sup("root", ["a", "inner", "z"], "rest_for_one", max_restarts=5),
            sup("inner", ["i1"], max_restarts=0),
        ]
    ).start()
    sim.clear()
    sim.crash("i1")
    assert sim.ops("stop") == ["z"]
    assert sim.ops("start") == ["i1", "z"]


def test_start_failure_fails_the_tree() -> None:
    sim = Sim.make([sup("root", ["a", "b", "c"])], auto_ready=False)
    sim.apply(sim.tree.start(0.0))
    sim.apply(sim.tree.started("a", 0.0))
    sim.clear()
    sim.apply(sim.tree.exited("b", 0.0, abnormal=True, reason="start_failed"))
    assert sim.ops("stop") == ["a"]
    assert isinstance(sim.outcome[-1], TreeFailed)
    assert "failed to start" in sim.outcome[-1].reason


def test_shutdown_stops_in_reverse_depth_first() -> None:
    sim = Sim.make([sup("root", ["a", "s", "d"]), sup("s", ["b", "c"])]).start()
    sim.clear()
    sim.apply(sim.tree.shutdown(1.0))
    assert sim.ops("stop") == ["d", "c", "b", "a"]
    assert sim.outcome[-1] == TreeStopped()


def test_shutdown_is_sequential() -> None:
    sim = Sim.make([sup("root", ["a", "b"])]).start()
    first = sim.tree.shutdown(1.0)
    assert first == [Stop("b")]
    assert sim.tree.exited("b", 1.0, abnormal=False) == [Stop("a")]
    assert sim.tree.exited("a", 1.0, abnormal=False) == [TreeStopped()]


def test_after_abandon_nothing_is_restarted_and_the_tree_ends_when_all_are_down() -> None:
    """kill_all during a shutdown: a nested supervisor whose turn has not come would
    otherwise restart a killed child (an orderly shutdown lets it, as OTP's does)."""
    sim = Sim.make([sup("root", ["a", "s", "d"]), sup("s", ["b", "c"])]).start()
    assert sim.tree.shutdown(1.0) == [Stop("d")]
    sim.clear()
    sim.apply(sim.tree.abandon(1.0))
    for name in ("b", "c", "a"):  # killed by the runtime, not stopped by the tree
        sim.apply(sim.tree.exited(name, 1.0, abnormal=True, reason="stopped"))
    assert sim.ops("start") == []
    assert sim.tree.exited("d", 1.0, abnormal=True, reason="stopped") == [TreeStopped()]


def test_shutdown_aborts_a_start_that_never_finishes() -> None:
    sim = Sim.make([sup("root", ["a", "b"])], auto_ready=False)
    sim.apply(sim.tree.start(0.0))
    sim.apply(sim.tree.started("a", 0.0))
    assert sim.tree.shutdown(1.0) == [Stop("b")]


def test_ctl_stop_keeps_child_down_without_counting() -> None:
    sim = Sim.make([sup("root", ["a", "b"], max_restarts=0)]).start()
    sim.clear()
    sim.apply(sim.tree.stop_child("a", 1.0))
    assert sim.ops("stop") == ["a"]
    assert sim.tree.state("a") == "stopped"
    assert sim.ops("start") == []
    assert not sim.outcome[1:]  # max_restarts=0 and still no give-up
    sim.apply(sim.tree.start_child("a", 2.0))
    assert sim.ops("start") == ["a"]
    assert sim.tree.state("a") == "running"


def test_ctl_pause_keeps_an_agent_up_and_frozen_until_resume() -> None:
    sim = Sim.make([sup("root", ["a", "b"], "one_for_all")]).start()
    sim.clear()
    assert sim.tree.pause_child("a", 1.0) == [Pause("a")]
    assert sim.tree.state("a") == "paused"
    assert sim.tree.pause_child("a", 1.0) == []  # already paused
    sim.apply(sim.tree.timer("a#0", 2.0))
    assert sim.ops("start") == [] and sim.ops("stop") == []  # nothing restarts it
    assert sim.tree.resume_child("a", 3.0) == [Resume("a")]
    assert sim.tree.state("a") == "running"
    assert sim.tree.resume_child("a", 3.0) == []  # not paused
    sim.apply(sim.tree.stop_child("b", 4.0))
    assert sim.tree.pause_child("b", 4.0) == []  # only a running agent pauses


def test_a_paused_agent_stops_and_restarts_like_a_running_one() -> None:
    sim = Sim.make([sup("root", ["a", "b"], "one_for_all")]).start()
    sim.clear()
    sim.apply(sim.tree.pause_child("a", 1.0))
    sim.crash("b")  # the group restart takes the paused sibling too, stop then start
    assert sim.ops("stop") == ["a"] and sim.ops("start") == ["a", "b"]
    assert sim.tree.state("a") == "running"
    sim.apply(sim.tree.pause_child("a", 2.0))
    sim.clear()
    sim.apply(sim.tree.shutdown(3.0))
    assert sim.ops("stop") == ["b", "a"] and sim.outcome[-1] == TreeStopped()


def test_ctl_restart_does_not_count_toward_intensity() -> None:
    sim = Sim.make([sup("root", ["a"], max_restarts=0)]).start()
    sim.clear()
    for i in range(3):
        sim.apply(sim.tree.restart_child("a", float(i)))
    assert sim.ops("start") == ["a"] * 3
    assert sim.outcome == [TreeReady()]


def test_restart_delay_waits_before_restart() -> None:
    sim = Sim.make([sup("root", ["a"])], {"a": ("permanent", 2.0)}).start()
    sim.clear()
    sim.crash("a")
    assert sim.tree.state("a") == "backoff"
    assert sim.ops("start") == []
    sim.advance(1.0)
    assert sim.ops("start") == []
    sim.advance(1.5)
    assert sim.ops("start") == ["a"]


def test_stop_during_backoff_cancels_the_timer() -> None:
    sim = Sim.make([sup("root", ["a"])], {"a": ("permanent", 2.0)}).start()
    sim.crash("a")
    sim.apply(sim.tree.stop_child("a", 0.5))
    sim.advance(5.0)
    assert sim.tree.state("a") == "stopped"
    assert sim.ops("start") == ["a"]  # only the first start


def test_stale_exit_of_old_incarnation_is_ignored() -> None:
    sim = Sim.make([sup("root", ["a"])]).start()
    sim.crash("a")
    before = list(sim.log)
    sim.apply(sim.tree.exited("a", 1.0, abnormal=True, incarnation=0))
    assert sim.log == before


def test_add_and_remove_children() -> None:
    sim = Sim.make([sup("root", ["a", "b"])]).start()
    sim.clear()
    sim.apply(sim.tree.add_child("root", "c", 1.0, agents={"c": ("permanent", 0.0)}))
    assert sim.ops("start") == ["c"]
    sim.apply(
        sim.tree.add_child(
            "root",
            "s",
            1.0,
            agents={"s1": ("permanent", 0.0)},
            supervisors={"s": sup("s", ["s1"])},
        )
    )
    assert sim.ops("start") == ["c", "s1"]
    sim.apply(sim.tree.remove_child("s", 2.0))
    sim.apply(sim.tree.remove_child("a", 2.0))
    assert sim.ops("stop") == ["s1", "a"]
    assert "a" not in sim.view and "s1" not in sim.view
    assert sim.tree.agents() == ["b", "c"]
    sim.apply(sim.tree.add_child("root", "m", 3.0, agents={"m": ("permanent", 0.0)}, index=1))
    assert sim.tree.agents() == ["b", "m", "c"]
    assert_indexed(sim.tree)


def test_set_timer_key_is_unique_per_backoff() -> None:
    sim = Sim.make([sup("root", ["a"])], {"a": ("permanent", 1.0)}).start()
    keys = []
    for _ in range(2):
        actions = sim.tree.exited("a", sim.now, abnormal=True)
        keys += [a.key for a in actions if isinstance(a, SetTimer)]
        sim.apply(actions)
        sim.advance(1.0)
    assert len(set(keys)) == 2
    assert sim.ops("start") == ["a", "a", "a"]


# --- properties --------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.sampled_from(["crash", "exit0", "stop", "start", "restart", "tick"]),
        st.integers(0, 5),
        st.floats(0, 3),
    ),
    max_size=40,
)
strategies = st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"])
restarts = st.lists(
    st.sampled_from(["permanent", "transient", "temporary"]), min_size=6, max_size=6
)


def assert_indexed(tree) -> None:
    """Each supervisor's index (up, waiting, position) says what a scan would, and its
    operation is under way."""
    for node in tree.sups.values():
        kids = [tree.children[c] for c in node.children]
        assert node.up == {c.name for c in kids if not c.down}
        assert node.waiting == {c.name for c in kids if c.down and c.goal == "running"}
        places = [node.position[c] for c in node.children]
        assert places == sorted(set(places)) and set(node.position) == set(node.children)
        # What it is busy with is under way: each child of it in the matching state.
        if node.busy is not None:
            want = {"start": "starting", "stop": "stopping", "delay": "backoff"}[node.busy.kind]
            assert node.busy.names and {tree.children[n].state for n in node.busy.names} == {want}


def _drive(strategy, types, max_restarts, script, pooled=False):
    names = [f"c{i}" for i in range(6)]
    # Every other child waits restart_delay before it comes back: the backoff state and
    # its timers are in the runs too. `pooled`: c2..c4 are one pool's members, which
    # start and stop together.
    table = {
        n: (t, 0.5 * (i % 2), False, "p" if pooled and 2 <= i <= 4 else None)
        for i, (n, t) in enumerate(zip(names, types, strict=True))
    }
    sim = Sim.make(
        [sup("root", names, strategy, max_restarts=max_restarts, max_seconds=5)], table
    ).start()
    restart_times: list[float] = []
    for op, idx, dt in script:
        if sim.outcome and not isinstance(sim.outcome[-1], TreeReady):
            break
        name = names[idx]
        sim.advance(dt)  # due restart_delay timers fire
        running = sim.tree.state(name) == "running"
        before = len(sim.ops("start"))
        if op in ("crash", "exit0") and running:
            sim.crash(name, abnormal=op == "crash")
            restarted = len(sim.ops("start")) > before or sim.tree.state(name) == "backoff"
            if restarted:
                restart_times.append(sim.now)
        elif op == "stop":
            sim.apply(sim.tree.stop_child(name, sim.now))
        elif op == "start":
            sim.apply(sim.tree.start_child(name, sim.now))
        elif op == "restart":
            sim.apply(sim.tree.restart_child(name, sim.now))
        assert_indexed(sim.tree)
    return sim, names, restart_times


@settings(max_examples=300, deadline=None)
@given(strategies, restarts, st.integers(0, 4), events, st.booleans())
def test_never_exceeds_intensity_without_giving_up(
    strategy, types, max_restarts, script, pooled
) -> None:
    sim, _names, times = _drive(strategy, types, max_restarts, script, pooled)
    failed = any(isinstance(o, TreeFailed) for o in sim.outcome)
    # Every accepted restart leaves at most max_restarts in any max_seconds window (the
    # failure that would have made one more is not a restart: it is giving up).
    for t in times:
        in_window = [u for u in times if t - 5 < u <= t]
        assert len(in_window) <= max_restarts
    if failed:
        assert not sim.running  # giving up stops every child


@settings(max_examples=300, deadline=None)
@given(strategies, restarts, st.integers(0, 4), events, st.booleans())
def test_temporary_child_is_never_restarted(strategy, types, max_restarts, script, pooled) -> None:
    sim, names, _ = _drive(strategy, types, max_restarts, script, pooled)
    temporary = {n for n, t in zip(names, types, strict=True) if t == "temporary"}
    starts = sim.ops("start")
    # A temporary child starts once, plus once per explicit ctl start/restart.
    explicit = {n: 1 for n in names}
    for op, idx, _ in script:
        if op in ("start", "restart"):
            explicit[names[idx]] += 1
    for name in temporary:
        assert starts.count(name) <= explicit[name]


@settings(max_examples=300, deadline=None)
@given(strategies, restarts, st.integers(0, 4), events)
def test_shutdown_stops_in_reverse_start_order(strategy, types, max_restarts, script) -> None:
    sim, names, _ = _drive(strategy, types, max_restarts, script)
    if sim.outcome and not isinstance(sim.outcome[-1], TreeReady):
        return
    up = [n for n in names if sim.tree.state(n) in ("running", "starting")]
    sim.clear()
    sim.apply(sim.tree.shutdown(sim.now + 1))
    assert sim.ops("stop") == list(reversed(up))
    assert sim.outcome[-1] == TreeStopped()
    assert not sim.running
