"""Config validation: every mistake is named by file and line, and nothing starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.daemon.config import ConfigError, load

GOOD = """\
[daemon]
runtime_dir = "/tmp/agentd-test"

[supervisor]
children = ["web", "workers"]

[supervisors.workers]
strategy = "one_for_all"
children = ["w"]

[agents.web]
command = ["/bin/sleep", "100"]

[agents.w]
module = "pkg.mod:Worker"
replicas = 3
limits = { memory_mb = 64 }
"""


def write(tmp_path: Path, text: str, name: str = "agentd.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path)
    return [str(i) for i in info.value.issues]


def test_good_config_builds_the_spec(tmp_path: Path) -> None:
    spec = load(write(tmp_path, GOOD))
    assert spec.supervisors["root"].children == ("web", "workers")
    assert spec.supervisors["workers"].children == ("w@0", "w@1", "w@2")
    assert spec.agents["w@1"].pool == "w" and spec.agents["w@1"].bus_agent
    assert spec.agents["w@1"].limits.memory_mb == 64
    assert spec.agents["web"].argv == ("/bin/sleep", "100")
    assert spec.daemon.control == "ipc:///tmp/agentd-test/control.sock"
    assert spec.daemon.log_dir == "/tmp/agentd-test/log"
    assert spec.pools["w"].replicas == 3


def test_defaults(tmp_path: Path) -> None:
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["x"]\n[agents.b]\ncommand = ["y"]\n'))
    root = spec.supervisors["root"]
    assert root.children == ("a", "b")  # every agent not named elsewhere, in file order
    assert (root.strategy, root.max_restarts, root.max_seconds) == ("one_for_one", 3, 5)
    a = spec.agents["a"]
    assert (a.restart, a.shutdown, a.stop_signal, a.start_seconds, a.heartbeat) == (
        "permanent",
        5.0,
        15,
        1.0,
        10.0,
    )


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ('[agents.a]\ncommand = ["x"]\nrestrat = "permanent"\n', 3, "unknown key `restrat`"),
        ('[agents.a]\ncommand = ["x"]\nreplicas = "two"\n', 3, "Expected `int | null`"),
        ('[agents.a]\ncommand = ["x"]\nrestart = "sometimes"\n', 3, "Invalid enum value"),
        ('[agents.a]\ncommand = ["x"]\nstop_signal = "SIGNOPE"\n', 3, "unknown signal"),
        ('[agents.a]\ncommand = ["x"]\nlimits = { memory_gb = 1 }\n', 3, "unknown key `memory_gb`"),
        ('[agents.a]\ncommand = ["x"]\nmodule = "m:C"\n', 1, "exactly one of"),
        ('[supervisor]\nchildren = ["ghost"]\n[agents.a]\ncommand = ["x"]\n', 2, "unknown child"),
        ('[agents.a]\ncommand = ["x"\n', 2, "TOML syntax"),
        ('[agents.bus]\ncommand = ["x"]\n', 1, "reserved name"),
        ('[agents."a.b"]\ncommand = ["x"]\n', 1, "bad name"),
        ('[daemon]\nbus = "tcp://127.0.0.1:5555"\n', 2, "needs CurveZMQ keys"),
        ('[daemon]\nshutdown_timeout = "soon"\n', 2, "Expected `float`"),
        ('[agents.a]\ncommand = ["x"]\nheartbeat = 0\n', 3, "must be > 0"),
        ('[agents.a]\ncommand = ["x"]\nuser = "no-such-user-agentd"\n', 3, "no such user"),
        (
            '[agents.a]\ncommand = ["x"]\n[agents.b]\ncommand = ["y"]\n[supervisor]\n'
            'children = ["a"]\n',
            3,
            "not a child of any supervisor",
        ),
        ("bogus = 1\n", 1, "unknown key `bogus`"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, needle: str) -> None:
    path = write(tmp_path, text)
    found = errors(path)
    assert any(e.startswith(f"{path}:{line}: ") and needle in e for e in found), found


def test_cycle_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[supervisors.x]\nchildren = ["y"]\n[supervisors.y]\nchildren = ["x"]\n',
    )
    assert any("cycle" in e for e in errors(path))


def test_child_listed_twice_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[supervisor]\nchildren = ["a", "s"]\n[supervisors.s]\nchildren = ["a"]\n'
        '[agents.a]\ncommand = ["x"]\n',
    )
    assert any(f"{path}:4: " in e and "already a child" in e for e in errors(path))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[agents.a]\ncommand = ["x"]\nrestrat = 1\n[agents.b]\ncommand = ["x"]\nack = "no"\n',
    )
    found = errors(path)
    assert len(found) == 2 and f"{path}:3: " in found[0] and f"{path}:6: " in found[1]


def test_include_drop_ins_and_duplicate_names(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["conf.d/*.toml"]\n[agents.a]\ncommand = ["x"]\n')
    write(tmp_path, '[agents.b]\ncommand = ["y"]\n', "conf.d/10-b.toml")
    spec = load(main)
    assert spec.supervisors["root"].children == ("a", "b")
    dup = write(tmp_path, '[agents.a]\ncommand = ["z"]\n', "conf.d/20-dup.toml")
    found = errors(main)
    assert any(str(dup) in e and str(main) in e and "defined twice" in e for e in found), found
    assert any(e.startswith(f"{dup}:1: ") for e in found)


def test_drop_in_may_not_set_daemon(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["d/*.toml"]\n[agents.a]\ncommand = ["x"]\n')
    drop = write(tmp_path, "[daemon]\nshutdown_timeout = 1\n", "d/x.toml")
    assert any(e.startswith(f"{drop}:1: ") for e in errors(main))


def test_runtime_dir_substitution(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path,
            f'[daemon]\nruntime_dir = "{tmp_path}/rt"\n'
            '[agents.a]\ncommand = ["x", "{runtime_dir}/sock"]\ncwd = "{runtime_dir}"\n'
            'env = { SOCK = "{runtime_dir}/s" }\n',
        )
    )
    agent = spec.agents["a"]
    assert agent.argv == ("x", f"{tmp_path}/rt/sock")
    assert agent.cwd == f"{tmp_path}/rt"
    assert dict(agent.env)["SOCK"] == f"{tmp_path}/rt/s"


def test_config_lookup_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[agents.a]\ncommand = ["x"]\n', "elsewhere.toml")
    monkeypatch.setenv("AGENTD_CONFIG", str(path))
    monkeypatch.chdir(tmp_path)
    assert load(None).files == (str(path),)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    result = run_cli("check", "--config", str(good))
    assert result.returncode == 0 and "ok" in result.stdout
    bad = write(tmp_path, '[agents.a]\ncommand = ["x"]\nrestrat = 1\n', "bad.toml")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: " in result.stderr and "restrat" in result.stderr


def test_run_refuses_bad_config_and_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = write(
        tmp_path,
        f'[agents.a]\ncommand = ["touch", "{marker}"]\nstart_seconds = 0\n'
        '[agents.b]\ncommand = ["x"]\nshutdown = -1\n',
    )
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:6: " in result.stderr
    assert not marker.exists()


def test_readme_config_tour_validates(tmp_path: Path) -> None:
    """The README's tour is a real config (its `user` swapped for one that exists here)."""
    import getpass

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tour = readme[readme.index("## A short tour of the config") :]
    block = tour.split("```toml\n", 1)[1].split("```", 1)[0]
    assert 'user = "app"' in block
    spec = load(write(tmp_path, block.replace('user = "app"', f'user = "{getpass.getuser()}"')))
    assert set(spec.agents) == {"ingress", "summarizer@0", "summarizer@1", "summarizer@2"}
    assert spec.daemon.death_signal and spec.daemon.max_frame == 1048576


# --- durable delivery (SPEC §10): state_dir, journal_sync, the per-agent keys ------------


def test_durable_delivery_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["x"]\nack = true\n'))
    assert spec.daemon.journal_sync == "batch"
    if os.getuid() == 0:
        assert spec.daemon.state_dir == "/var/lib/agentd"
    a = spec.agents["a"]
    assert (a.max_deliveries, a.retry_backoff, a.max_in_flight, a.max_pending) == (
        5,
        0.5,
        100,
        10_000,
    )


def test_state_dir_default_is_systemds_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/lib/agentd:{tmp_path}/other")
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["x"]\n'))
    assert spec.daemon.state_dir == f"{tmp_path}/lib/agentd"  # the first of the list


def test_state_dir_setting_and_substitution(tmp_path: Path) -> None:
    spec = load(write(tmp_path, '[daemon]\nstate_dir = "state"\njournal_sync = "always"\n'))
    assert spec.daemon.state_dir == f"{tmp_path}/state"  # relative to the config file
    assert spec.daemon.journal_sync == "always"
    text = f'[daemon]\nruntime_dir = "{tmp_path}/rt"\nstate_dir = "{{runtime_dir}}/../st"\n'
    assert load(write(tmp_path, text)).daemon.state_dir == f"{tmp_path}/rt/../st"


def test_runtime_dir_default_agrees_between_the_unit_and_a_root_shell() -> None:
    """`agentd ctl` from a root shell or sudo must find the daemon the unit started."""
    from agentd.daemon.locate import runtime_dir_default

    unit = {"RUNTIME_DIRECTORY": "/run/agentd", "STATE_DIRECTORY": "/var/lib/agentd"}
    assert runtime_dir_default(unit, uid=0) == "/run/agentd"  # systemd's RuntimeDirectory=
    assert runtime_dir_default({}, uid=0) == "/run/agentd"  # sudo: no XDG_RUNTIME_DIR
    assert runtime_dir_default({"XDG_RUNTIME_DIR": "/run/user/0"}, uid=0) == "/run/agentd"
    listed = {"RUNTIME_DIRECTORY": "/run/a:/run/b", "XDG_RUNTIME_DIR": "/run/user/1000"}
    assert runtime_dir_default(listed, uid=1000) == "/run/a"  # the first of the list
    xdg = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert runtime_dir_default(xdg, uid=1000) == "/run/user/1000/agentd"
    assert runtime_dir_default({"XDG_RUNTIME_DIR": "rel"}, uid=1000) == "/tmp/agentd-1000"
    assert runtime_dir_default({}, uid=1000) == "/tmp/agentd-1000"


def test_runtime_and_log_dir_defaults_are_systemds_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the unit: sockets in RuntimeDirectory=, logs in LogsDirectory= (kept on restart)."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path}/run/agentd")
    monkeypatch.setenv("LOGS_DIRECTORY", f"{tmp_path}/log/agentd:{tmp_path}/log/other")
    daemon = load(write(tmp_path, '[agents.a]\ncommand = ["x"]\n')).daemon
    assert daemon.runtime_dir == f"{tmp_path}/run/agentd"
    assert daemon.control == f"ipc://{tmp_path}/run/agentd/control.sock"
    assert daemon.log_dir == f"{tmp_path}/log/agentd"
    text = '[daemon]\nlog_dir = "{runtime_dir}/mine"\n[agents.a]\ncommand = ["x"]\n'
    assert load(write(tmp_path, text)).daemon.log_dir == f"{tmp_path}/run/agentd/mine"
    monkeypatch.delenv("LOGS_DIRECTORY")  # outside systemd: <runtime_dir>/log
    assert load(write(tmp_path, '[agents.a]\ncommand = ["x"]\n')).daemon.log_dir == (
        f"{tmp_path}/run/agentd/log"
    )


def test_state_dir_default_for_other_users(tmp_path: Path) -> None:
    """Not root: $XDG_STATE_HOME/agentd, else ~/.local/state/agentd; root: /var/lib/agentd."""
    from agentd.daemon.locate import state_dir_default

    home = {"HOME": str(tmp_path)}
    assert state_dir_default({**home, "XDG_STATE_HOME": "/xdg"}, uid=1000) == "/xdg/agentd"
    relative = {**home, "XDG_STATE_HOME": "rel"}  # the XDG spec: ignored
    assert state_dir_default(relative, uid=1000) == f"{tmp_path}/.local/state/agentd"
    assert state_dir_default(home, uid=1000) == f"{tmp_path}/.local/state/agentd"
    assert state_dir_default({**home, "XDG_STATE_HOME": "/xdg"}, uid=0) == "/var/lib/agentd"
    systemd = {**home, "STATE_DIRECTORY": "/var/lib/agentd:/var/lib/other"}
    assert state_dir_default(systemd, uid=1000) == "/var/lib/agentd"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("max_deliveries", "0", "between 1 and 1000"),
        ("max_deliveries", "1001", "between 1 and 1000"),
        ("max_in_flight", "0", "between 1 and 100000"),
        ("max_in_flight", "100001", "between 1 and 100000"),
        ("max_pending", "0", "between 1 and 10000000"),
        ("max_pending", "10000001", "between 1 and 10000000"),
        ("retry_backoff", "0", "must be > 0 and <= 30"),
        ("retry_backoff", "-1.5", "must be > 0 and <= 30"),
        ("retry_backoff", "30.5", "must be > 0 and <= 30"),
        ("retry_backoff", "nan", "must be > 0 and <= 30"),
        ("max_pending", '"lots"', "Expected `int`"),
        ("max_deliveries", "2.5", "Expected `int`"),
    ],
)
def test_durable_delivery_bounds(tmp_path: Path, key: str, value: str, needle: str) -> None:
    path = write(tmp_path, f'[agents.a]\ncommand = ["x"]\nack = true\n{key} = {value}\n')
    found = errors(path)
    assert any(e.startswith(f"{path}:4: ") and key in e and needle in e for e in found), found


def test_durable_delivery_bounds_are_inclusive(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path,
            '[agents.lo]\ncommand = ["x"]\nmax_deliveries = 1\nmax_in_flight = 1\n'
            "max_pending = 1\nretry_backoff = 0.001\n"
            '[agents.hi]\ncommand = ["x"]\nmax_deliveries = 1000\nmax_in_flight = 100000\n'
            "max_pending = 10000000\nretry_backoff = 30\n",
        )
    )
    hi = spec.agents["hi"]
    assert (hi.max_deliveries, hi.max_in_flight, hi.max_pending) == (1000, 100_000, 10_000_000)
    assert hi.retry_backoff == 30.0 and spec.agents["lo"].retry_backoff == 0.001


def test_journal_sync_must_be_batch_or_always(tmp_path: Path) -> None:
    path = write(tmp_path, '[daemon]\njournal_sync = "sometimes"\n')
    assert any(f"{path}:2: " in e and "Invalid enum value" in e for e in errors(path))


@pytest.mark.parametrize(
    "state_dir", ["{rt}", "{rt}/state", "{rt}/a/../state", "{{runtime_dir}}/s"]
)
def test_state_dir_under_runtime_dir_is_an_error(tmp_path: Path, state_dir: str) -> None:
    rt = f"{tmp_path}/rt"
    text = f'[daemon]\nruntime_dir = "{rt}"\nstate_dir = "{state_dir.format(rt=rt)}"\n'
    path = write(tmp_path, text)
    found = errors(path)
    assert any(f"{path}:3: " in e and "under runtime_dir" in e for e in found), found


def test_state_dir_next_to_runtime_dir_is_fine(tmp_path: Path) -> None:
    """A sibling whose name starts like runtime_dir's is not under it."""
    text = f'[daemon]\nruntime_dir = "{tmp_path}/rt"\nstate_dir = "{tmp_path}/rt-state"\n'
    assert load(write(tmp_path, text)).daemon.state_dir == f"{tmp_path}/rt-state"


def test_values_reach_the_agent_table_and_the_broker_argv(tmp_path: Path) -> None:
    from agentd.bus.link import AgentEntry
    from agentd.daemon.bus import agent_table, broker_spec

    spec = load(
        write(
            tmp_path,
            f'[daemon]\nstate_dir = "{tmp_path}/st"\njournal_sync = "always"\n'
            '[agents.w]\ncommand = ["x"]\nack = true\nreplicas = 2\nmax_deliveries = 3\n'
            "retry_backoff = 2\nmax_in_flight = 7\nmax_pending = 50\n"
            '[agents.plain]\ncommand = ["y"]\n',
        )
    )
    table = {e.name: e for e in agent_table(spec)}
    assert table["w@1"] == AgentEntry(
        name="w@1",
        pool="w",
        ack=True,
        max_deliveries=3,
        retry_backoff=2.0,
        max_in_flight=7,
        max_pending=50,
    )
    assert table["plain"] == AgentEntry(name="plain")  # every default
    argv = broker_spec(spec.daemon).argv
    journal = argv.index("--journal")
    assert argv[journal + 1] == f"{tmp_path}/st/bus.journal"
    assert argv[argv.index("--journal-sync") + 1] == "always"
    default = load(write(tmp_path, f'[daemon]\nstate_dir = "{tmp_path}/st"\n')).daemon
    argv = broker_spec(default).argv
    assert argv[argv.index("--journal-sync") + 1] == "batch"
