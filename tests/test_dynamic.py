"""Dynamic supervisors (SPEC §12): spawn/terminate from ctl, Client and the SDK; args;
max_children; taken names; the record in state_dir (a clean stop and a kill -9 of the
daemon); one-for-one restarts; reload; config errors; and the pure parts.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from agentd.bus import Client, RemoteError
from agentd.bus.envelope import AgentEntry, Spawn, SpawnReply, Terminate
from agentd.daemon.config import ConfigError, load
from agentd.daemon.dynamic import (
    ARGS_MAX,
    Child,
    Record,
    SpawnError,
    child_spec,
    encode_args,
    name_problem,
    with_children,
)
from agentd.daemon.spawn import agent_env
from agentd.daemon.tree import Policy
from tests.conftest import alive, wait_for
from tests.fake_runtime import Sim, sup
from tests.test_router import Net

ROOT = Path(__file__).resolve().parent.parent

CONFIG = f"""
[supervisor]
children = ["spawner", "sessions", "jobs", "broken"]

[supervisors.sessions]
strategy = "dynamic"
template = "session"
max_children = 3

[supervisors.jobs]
strategy = "dynamic"
template = "job"

[supervisors.broken]
strategy = "dynamic"
template = "crash"

[agents.crash]
command = ["/bin/sh", "-c", "echo cannot start >&2; exit 3"]
start_seconds = 0.5

[agents.session]
module = "tests.dynamic_agents:Session"
cwd = "{ROOT}"

[agents.job]
module = "tests.dynamic_agents:Session"
cwd = "{ROOT}"
restart = "temporary"

[agents.spawner]
module = "tests.dynamic_agents:Spawner"
cwd = "{ROOT}"
"""


def rows(d: Any) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in d.ctl_json("status")["agents"]}


def recorded(d: Any) -> list[str]:
    path = d.state_dir / "dynamic.json"
    return [c["name"] for c in json.loads(path.read_text())["children"]] if path.exists() else []


def refused(d: Any, *args: str) -> str:
    result = d.ctl(*args)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    return result.stderr


def bus(d: Any) -> Client:
    return Client(f"ipc://{d.runtime_dir}/bus.sock", name="tester")


# --- a real daemon ----------------------------------------------------------------------


def test_spawn_and_terminate_from_ctl_client_and_sdk(daemon_factory) -> None:
    d = daemon_factory(CONFIG).start()
    # ctl, with args
    result = d.ctl("spawn", "sessions", "s1", "--args", '{"n": 1, "tags": ["a"]}')
    assert result.returncode == 0, result.stderr
    with bus(d) as c:
        got = c.request("s1", "session.args")
        assert got["args"] == {"n": 1, "tags": ["a"]}
        assert json.loads(got["env"]) == {"n": 1, "tags": ["a"]}
        # Client, no args
        c.spawn("sessions", "s2")
        assert c.request("s2", "session.args")["args"] is None
        assert c.request("s2", "session.args")["env"] is None
        # the SDK: an agent spawns a child when it gets a signal
        asked = {"supervisor": "sessions", "name": "s3", "args": [1, 2]}
        assert c.request("spawner", "spawner.spawn", asked, timeout=30) == {"ok": True}
        assert c.request("s3", "session.args")["args"] == [1, 2]

        table = rows(d)
        assert {table[n]["supervisor"] for n in ("s1", "s2", "s3")} == {"sessions"}
        assert all(table[n]["state"] == "running" for n in ("s1", "s2", "s3"))
        tree = d.ctl("tree").stdout
        assert "sessions [dynamic of session, max 3, 3 in 5s] running" in tree
        assert all(f"── {n} (transient) running pid" in tree for n in ("s1", "s2", "s3"))
        assert recorded(d) == ["s1", "s2", "s3"]  # transient: recorded
        assert d.wait_event("agent.spawned", "s3")["supervisor"] == "sessions"

        # max_children = 3, from each of the three callers
        assert "max_children (3) is reached" in refused(d, "spawn", "sessions", "s4")
        with pytest.raises(RemoteError, match="max_children"):
            c.spawn("sessions", "s4")
        asked["name"] = "s4"
        answer = c.request("spawner", "spawner.spawn", asked, timeout=30)
        assert answer["ok"] is False and "max_children" in answer["error"]

        # names that are taken or not names, and other refusals
        assert "taken" in refused(d, "spawn", "jobs", "s1")  # a child of another supervisor
        assert "taken" in refused(d, "spawn", "jobs", "spawner")  # a configured agent
        assert "taken" in refused(d, "spawn", "jobs", "session")  # a template
        assert "taken" in refused(d, "spawn", "jobs", "sessions")  # a supervisor
        assert "reserved" in refused(d, "spawn", "jobs", "bus")
        assert "bad name" in refused(d, "spawn", "jobs", "a@1")
        assert "unknown supervisor `nope`" in refused(d, "spawn", "nope", "x")
        assert "not a dynamic supervisor" in refused(d, "spawn", "root", "x")
        assert "--args is not JSON" in refused(d, "spawn", "jobs", "x", "--args", "{")
        big = json.dumps("x" * ARGS_MAX)
        assert "more than the" in refused(d, "spawn", "jobs", "x", "--args", big)
        with pytest.raises(RemoteError, match="taken"):
            c.spawn("jobs", "s2")
        # a child that cannot start is not kept: the spawn fails, with why
        stderr = refused(d, "spawn", "broken", "x")
        assert "`x` did not start (start_failed, code 3; stderr: cannot start)" in stderr
        assert "x" not in rows(d) and "x" not in recorded(d)

        # terminate: ctl, Client, SDK
        assert d.ctl("terminate", "s1").returncode == 0
        c.terminate("s2")
        assert c.request("spawner", "spawner.terminate", "s3", timeout=30) == {"ok": True}
        assert not {"s1", "s2", "s3"} & set(rows(d))
        assert recorded(d) == []
        assert "unknown agent `s1`" in refused(d, "terminate", "s1")
        assert "not a dynamic child" in refused(d, "terminate", "spawner")
        with pytest.raises(RemoteError, match="unknown agent"):
            c.terminate("s2")

        # a name is free again once its child is gone
        c.spawn("sessions", "s1")
        assert c.request("s1", "session.args")["args"] is None


def test_restart_one_for_one_and_normal_end_and_the_record_across_daemon_restarts(
    daemon_factory,
) -> None:
    d = daemon_factory(CONFIG).start()
    with bus(d) as c:
        c.spawn("sessions", "a", {"k": "A"})
        c.spawn("sessions", "b", {"k": "B"})
        c.spawn("jobs", "j")  # temporary: never recorded
        assert recorded(d) == ["a", "b"]
        before = {n: rows(d)[n]["pid"] for n in ("spawner", "a", "b", "j")}

        # one for one: kill a's pid → a restarted, siblings untouched
        os.kill(before["a"], signal.SIGKILL)
        d.wait_event("agent.ready", "a", count=2)
        after = rows(d)
        assert after["a"]["pid"] != before["a"] and after["a"]["restarts"] == 1
        assert {n: after[n]["pid"] for n in ("spawner", "b", "j")} == {
            n: before[n] for n in ("spawner", "b", "j")
        }
        assert c.request("a", "session.args")["args"] == {"k": "A"}

        # a transient child that ends normally is gone, from the tree and the record
        c.spawn("sessions", "t")
        assert recorded(d) == ["a", "b", "t"]
        c.send("t", "session.quit")
        wait_for(lambda: "t" not in rows(d), 10, "t to be forgotten")
        assert recorded(d) == ["a", "b"]

    # a clean stop, then a start: a and b come back with their args, j does not
    assert d.stop() == 0
    d2 = daemon_factory(CONFIG).start()
    table = rows(d2)
    assert table["a"]["state"] == table["b"]["state"] == "running"
    assert "j" not in table
    with bus(d2) as c:
        assert c.request("b", "session.args")["args"] == {"k": "B"}

    # kill -9 of the daemon: its agents die with it, and the next start spawns them again
    pids = [table[n]["pid"] for n in ("a", "b")]
    d2.signal(signal.SIGKILL)
    d2.wait()
    wait_for(lambda: not any(alive(p) for p in pids), 10, "the children to die with agentd")
    # two entries the next start cannot bring back: one that fails to start now, and one
    # whose supervisor is gone. Neither takes the tree down; both leave the record.
    path = d2.state_dir / "dynamic.json"
    record = json.loads(path.read_text())
    record["children"] += [{"name": "zz", "supervisor": "broken"}]
    record["children"] += [{"name": "y", "supervisor": "no"}]
    path.write_text(json.dumps(record))
    d3 = daemon_factory(CONFIG).start()
    table = rows(d3)
    assert table["a"]["state"] == table["b"]["state"] == "running"
    assert "did not start" in d3.wait_event("agent.spawn_failed", "zz")["reason"]
    wait_for(lambda: recorded(d3) == ["a", "b"], 10, "the record without zz and y")
    assert "zz" not in rows(d3) and "y" not in rows(d3)
    with bus(d3) as c:
        assert c.request("a", "session.args")["args"] == {"k": "A"}


def test_reload_keeps_children_restarts_them_on_a_new_template_drops_them_with_it(
    daemon_factory,
) -> None:
    d = daemon_factory(CONFIG).start()
    with bus(d) as c:
        c.spawn("sessions", "r", [7])
        pid = rows(d)["r"]["pid"]
        # an unrelated change: r is not touched
        d.rewrite(CONFIG.replace("max_children = 3", "max_children = 5"))
        assert d.ctl("reload").returncode == 0
        assert rows(d)["r"]["pid"] == pid
        # the template changed: r restarts from it, same name and args
        d.rewrite(
            CONFIG.replace(
                'module = "tests.dynamic_agents:Session"\ncwd',
                'module = "tests.dynamic_agents:Session"\nenv = { X = "1" }\ncwd',
                1,
            )
        )
        assert d.ctl("reload").returncode == 0
        assert rows(d)["r"]["pid"] != pid
        assert c.request("r", "session.args")["args"] == [7]
        assert recorded(d) == ["r"]
    # the supervisor removed: its children stop and leave the record
    without = re.sub(r"\[(supervisors\.sessions|agents\.session)\][^\[]*", "", CONFIG)
    d.rewrite(without.replace('"spawner", "sessions",', '"spawner",'))
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "r" not in rows(d)
    assert recorded(d) == []


# --- config -----------------------------------------------------------------------------


def config_errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "agentd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\nchildren = ["b"]\n'
            '[agents.a]\ncommand = ["true"]\n[agents.b]\ncommand = ["true"]\n',
            4,
            "a dynamic supervisor has no configured children",
        ),
        ('[supervisors.s]\nstrategy = "dynamic"\n', 2, "needs `template`"),
        ('[supervisors.s]\nstrategy = "dynamic"\ntemplate = "zz"\n', 3, "`zz` is not defined"),
        (
            '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "t"\n'
            "[supervisors.t]\nchildren = []\n",
            3,
            "`t` is a supervisor",
        ),
        (
            '[supervisor]\nchildren = ["a", "s"]\n[supervisors.s]\nstrategy = "dynamic"\n'
            'template = "a"\n[agents.a]\ncommand = ["true"]\n',
            2,
            "`a` is a dynamic supervisor's template",
        ),
        (
            '[supervisors.s]\nchildren = ["a"]\ntemplate = "a"\n[agents.a]\ncommand = ["true"]\n',
            3,
            'only a supervisor with strategy = "dynamic"',
        ),
        (
            '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\nmax_children = 100001\n'
            '[agents.a]\ncommand = ["true"]\n',
            4,
            "must be between 1 and 100000",
        ),
        (
            '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\n'
            '[agents.a]\ncommand = ["true"]\nreplicas = 2\n',
            6,
            "a template (of `supervisors.s`) is not a pool",
        ),
    ],
)
def test_config_errors_name_their_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    found = config_errors(tmp_path, text)
    path = tmp_path / "agentd.toml"
    assert any(e.startswith(f"{path}:{line}: ") and message in e for e in found), found


def test_config_template_is_not_started_and_children_are_transient_unless_set(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(
        '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\n'
        '[supervisors.p]\nstrategy = "dynamic"\ntemplate = "b"\nmax_children = 7\n'
        '[agents.a]\ncommand = ["true"]\n[agents.b]\ncommand = ["true"]\nrestart = "permanent"\n'
        '[agents.c]\ncommand = ["true"]\n'
    )
    spec = load(path)
    assert set(spec.agents) == {"c"} and set(spec.templates) == {"a", "b"}
    assert spec.supervisors["root"].children == ("s", "p", "c")  # no template among them
    assert spec.templates["a"].restart == "transient"  # the default for a template
    assert spec.templates["b"].restart == "permanent"  # said in the file: kept
    assert spec.supervisors["s"].max_children == 1000
    assert spec.supervisors["p"].max_children == 7
    assert spec.supervisors["s"].children == ()
    # nested anywhere, and at the root too
    path.write_text(
        '[supervisors.outer]\nstrategy = "one_for_all"\nchildren = ["c", "s"]\n'
        '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\n'
        '[agents.a]\ncommand = ["true"]\n[agents.c]\ncommand = ["true"]\n'
    )
    assert load(path).supervisors["outer"].children == ("c", "s")
    path.write_text(
        '[supervisor]\nstrategy = "dynamic"\ntemplate = "a"\n[agents.a]\ncommand = ["true"]\n'
    )
    spec = load(path)
    assert spec.supervisors["root"].children == () and spec.supervisors["root"].template == "a"


# --- the pure parts ---------------------------------------------------------------------


def test_tree_dynamic_children_one_for_one_and_a_restarted_supervisor() -> None:
    """Pure tree: one for one among children added at run time; when the dynamic
    supervisor is restarted by its parent, its temporary children stay ended."""
    sim = Sim.make(
        [sup("root", ["web", "dyn"], max_restarts=5), sup("dyn", [], "dynamic", max_restarts=1)],
    ).start()
    for name, restart in (("a", "transient"), ("b", "transient"), ("t", "temporary")):
        sim.apply(sim.tree.add_child("dyn", name, sim.now, agents={name: Policy(restart)}))
    assert sim.ops("start") == ["web", "a", "b", "t"]
    sim.clear()
    sim.crash("a")
    assert sim.ops("start") == ["a"] and sim.ops("stop") == []  # siblings untouched
    sim.clear()
    sim.crash("b")  # the second restart within the window: dyn gives up, root restarts it
    assert "supervisor.gave_up" in [n.event for n in sim.notes]
    assert sorted(sim.ops("start")) == ["a", "b"]  # not t
    assert sim.view.child("t").goal == "ended" and sim.tree.state("dyn") == "running"


def test_args_are_compact_json_and_bounded() -> None:
    assert encode_args(None) is None
    assert encode_args({"a": [1, "é"]}) == '{"a":[1,"é"]}'
    with pytest.raises(SpawnError, match="JSON"):
        encode_args({"a": b"bytes"})
    with pytest.raises(SpawnError, match="JSON"):
        encode_args(float("nan"))
    with pytest.raises(SpawnError, match="more than"):
        encode_args("x" * ARGS_MAX)


def test_with_children_keeps_those_whose_supervisor_is_still_dynamic(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(
        '[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\n'
        '[agents.a]\ncommand = ["true"]\nenv = { AGENTD_ARGS = "no", K = "v" }\n'
        '[agents.c]\ncommand = ["true"]\n'
    )
    spec = load(path)
    children = [
        Child("k1", "s", '{"n":1}'),
        Child("k2", "s"),
        Child("gone", "nosuch"),  # its supervisor was removed
        Child("c", "s"),  # a configured agent has the name now
        Child("root", "s"),
    ]
    new, kept = with_children(spec, children)
    assert [c.name for c in kept] == ["k1", "k2"]
    assert new.supervisors["s"].children == ("k1", "k2")
    assert new.agents["k1"].args == '{"n":1}' and new.agents["k2"].args is None
    env = agent_env(new.agents["k1"], 0, "ipc:///x")
    assert env["AGENTD_ARGS"] == '{"n":1}' and env["K"] == "v"  # the spawn's args win,
    assert "AGENTD_ARGS" not in agent_env(new.agents["k2"], 0, "ipc:///x")  # and no args: none
    assert new.agents["k1"].restart == "transient" and new.agents["k1"].pool is None
    assert child_spec(spec.templates["a"], "z", None).name == "z"
    assert name_problem(new, "k1") == "the name `k1` is taken"
    assert name_problem(new, "fresh") is None
    assert "bad name" in (name_problem(new, 7) or "")


def test_record_round_trip_and_a_bad_file_set_aside(tmp_path: Path) -> None:
    record = Record(str(tmp_path))
    assert record.load() == []
    record.save([Child("a", "s", "[1]"), Child("b", "s")])
    assert record.load() == [Child("a", "s", "[1]"), Child("b", "s")]
    assert not (tmp_path / "dynamic.json.tmp").exists()
    (tmp_path / "dynamic.json").write_text("{not json")
    assert record.load() == []
    assert (tmp_path / "dynamic.json.bad").read_text() == "{not json"


def test_router_forwards_spawn_and_terminate_to_agentd_and_the_reply_back() -> None:
    net = Net(AgentEntry("w"))
    net.agent("w")
    net.send("w", Spawn("r1", "sessions", "s1", {"a": 1}, caller="forged"))
    [forwarded] = [f for f in net.take("agentd") if isinstance(f, Spawn)]
    assert (forwarded.caller, forwarded.name, forwarded.args) == ("w", "s1", {"a": 1})
    net.send("agentd", SpawnReply("r1", False, "name taken", to="w"))
    assert [f for f in net.take("w") if isinstance(f, SpawnReply)] == [
        SpawnReply("r1", False, "name taken")
    ]
    net.send("w", Terminate("r2", "s1"))
    assert [f.caller for f in net.take("agentd") if isinstance(f, Terminate)] == ["w"]
    # no daemon connected: answered by the broker itself
    lone = Net()
    lone.send("w", Spawn("r3", "sessions", "s1"))
    [answer] = [f for f in lone.take("w") if isinstance(f, SpawnReply)]
    assert answer.id == "r3" and not answer.ok and "no agentd" in (answer.error or "")


def test_a_spawn_within_a_trace_is_in_the_trace_with_the_daemons_answer() -> None:
    tp = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    net = Net(AgentEntry("w"))
    net.agent("w")
    net.send("w", Spawn("r1", "sessions", "s1", traceparent=tp, causation_id="sig-1"))
    net.send("agentd", SpawnReply("r1", True, to="w"))
    net.send("w", Terminate("r2", "s1", traceparent=tp, causation_id="sig-1"))
    net.send("agentd", SpawnReply("r2", False, "no such child", to="w"))
    net.send("w", Spawn("r3", "sessions", "s2"))  # from outside any trace: not recorded
    records = {r.id: r for r in net.router.traces.answer("r1").records}
    assert set(records) == {"r1", "r2"}
    spawn, terminate = records["r1"], records["r2"]
    assert (spawn.type, spawn.source, spawn.to, spawn.causation_id) == (
        "agentd.spawn",
        "w",
        "s1",
        "sig-1",
    )
    assert spawn.outcome == "done"
    assert (terminate.type, terminate.outcome, terminate.error) == (
        "agentd.terminate",
        "error",
        "no such child",
    )
