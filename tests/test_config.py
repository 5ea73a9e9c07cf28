"""Config validation: every mistake is named by file and line, and nothing starts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import msgspec
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
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["true"]\n[agents.b]\ncommand = ["true"]\n'))
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
        ('[agents.a]\ncommand = ["true"]\nrestrat = "permanent"\n', 3, "unknown key `restrat`"),
        ('[agents.a]\ncommand = ["true"]\nreplicas = "two"\n', 3, "Expected `int | null`"),
        ('[agents.a]\ncommand = ["true"]\nrestart = "sometimes"\n', 3, "Invalid enum value"),
        ('[agents.a]\ncommand = ["true"]\nstop_signal = "SIGNOPE"\n', 3, "unknown signal"),
        (
            '[agents.a]\ncommand = ["true"]\nlimits = { memory_gb = 1 }\n',
            3,
            "unknown key `memory_gb`",
        ),
        ('[agents.a]\ncommand = ["true"]\nmodule = "m:C"\n', 1, "exactly one of"),
        (
            '[supervisor]\nchildren = ["ghost"]\n[agents.a]\ncommand = ["true"]\n',
            2,
            "unknown child",
        ),
        ('[agents.a]\ncommand = ["x"\n', 2, "TOML syntax"),
        ('[agents.bus]\ncommand = ["true"]\n', 1, "reserved name"),
        ('[agents."a.b"]\ncommand = ["true"]\n', 1, "bad name"),
        ('[daemon]\nbus = "tcp://127.0.0.1:5555"\n', 2, "needs CurveZMQ keys"),
        ('[daemon]\nkeys_dir = "k"\ncontrol = "tcp://127.0.0.1"\n', 3, "needs a host and a port"),
        ('[daemon]\n\nbus = "udp://127.0.0.1:5555"\n', 3, "unknown transport 'udp'"),
        ('[daemon]\ncontrol = "/run/agentd/control.sock"\n', 2, "is not an endpoint"),
        ('[agents.a]\ncommand = ["true"]\nsignificant = true\n', 3, "a permanent child"),
        ('[supervisor]\nsignificant = true\n[agents.a]\ncommand = ["true"]\n', 2, "the root"),
        ("[supervisors.s]\nchildren = []\nsignificant = true\n", 3, "a permanent child"),
        ('[supervisor]\nauto_shutdown = "some"\n', 2, "Invalid enum value"),
        ("[supervisors.s]\nchildren = []\nshutdown = 5\n", 3, "Expected `str`"),
        ('[agents.a]\ncommand = ["true"]\nshutdown = "forever"\n', 3, "shutdown"),
        ('[daemon]\nshutdown_timeout = "soon"\n', 2, "Expected `float`"),
        ('[agents.a]\ncommand = ["true"]\nheartbeat = 0\n', 3, "must be > 0"),
        ('[agents.a]\ncommand = ["true"]\nuser = "no-such-user-agentd"\n', 3, "no such user"),
        (
            '[agents.a]\ncommand = ["true"]\n[agents.b]\ncommand = ["true"]\n[supervisor]\n'
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
        '[agents.a]\ncommand = ["true"]\n',
    )
    assert any(f"{path}:4: " in e and "already a child" in e for e in errors(path))


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[agents.a]\ncommand = ["true"]\nrestrat = 1\n[agents.b]\ncommand = ["true"]\nack = "no"\n',
    )
    found = errors(path)
    assert len(found) == 2 and f"{path}:3: " in found[0] and f"{path}:6: " in found[1]


def test_include_drop_ins_and_duplicate_names(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["conf.d/*.toml"]\n[agents.a]\ncommand = ["true"]\n')
    write(tmp_path, '[agents.b]\ncommand = ["true"]\n', "conf.d/10-b.toml")
    spec = load(main)
    assert spec.supervisors["root"].children == ("a", "b")
    dup = write(tmp_path, '[agents.a]\ncommand = ["true"]\n', "conf.d/20-dup.toml")
    found = errors(main)
    assert any(str(dup) in e and str(main) in e and "defined twice" in e for e in found), found
    assert any(e.startswith(f"{dup}:1: ") for e in found)


def test_drop_in_may_not_set_daemon(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["d/*.toml"]\n[agents.a]\ncommand = ["true"]\n')
    drop = write(tmp_path, "[daemon]\nshutdown_timeout = 1\n", "d/x.toml")
    assert any(e.startswith(f"{drop}:1: ") for e in errors(main))


def test_runtime_dir_substitution(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path,
            f'[daemon]\nruntime_dir = "{tmp_path}/rt"\n'
            '[agents.a]\ncommand = ["true", "{runtime_dir}/sock"]\ncwd = "{runtime_dir}"\n'
            'env = { SOCK = "{runtime_dir}/s" }\n',
        )
    )
    agent = spec.agents["a"]
    assert agent.argv == ("true", f"{tmp_path}/rt/sock")
    assert agent.cwd == f"{tmp_path}/rt"
    assert dict(agent.env)["SOCK"] == f"{tmp_path}/rt/s"


def test_config_lookup_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[agents.a]\ncommand = ["true"]\n', "elsewhere.toml")
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
    bad = write(tmp_path, '[agents.a]\ncommand = ["true"]\nrestrat = 1\n', "bad.toml")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: " in result.stderr and "restrat" in result.stderr


def test_run_refuses_bad_config_and_starts_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = write(
        tmp_path,
        f'[agents.a]\ncommand = ["touch", "{marker}"]\nstart_seconds = 0\n'
        '[agents.b]\ncommand = ["true"]\nshutdown = -1\n',
    )
    result = run_cli("run", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:6: " in result.stderr
    assert not marker.exists()


def test_readme_config_tour_validates(tmp_path: Path) -> None:
    """The README's tour is a real config (its `user` and node swapped for ones here)."""
    import getpass

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tour = readme[readme.index("## A short tour of the config") :]
    block = tour.split("```toml\n", 1)[1].split("```", 1)[0]
    assert 'user = "app"' in block and '"/usr/bin/node"' in block
    block = block.replace('user = "app"', f'user = "{getpass.getuser()}"')
    spec = load(write(tmp_path, block.replace('"/usr/bin/node"', f'"{sys.executable}"')))
    assert set(spec.agents) == {"ingress", "summarizer@0", "summarizer@1", "summarizer@2"}
    assert spec.daemon.death_signal and spec.daemon.max_frame == 1048576


# --- durable delivery (SPEC §10): state_dir, journal_sync, the per-agent keys ------------


def test_durable_delivery_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["true"]\nack = true\n'))
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
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["true"]\n'))
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
    daemon = load(write(tmp_path, '[agents.a]\ncommand = ["true"]\n')).daemon
    assert daemon.runtime_dir == f"{tmp_path}/run/agentd"
    assert daemon.control == f"ipc://{tmp_path}/run/agentd/control.sock"
    assert daemon.log_dir == f"{tmp_path}/log/agentd"
    text = '[daemon]\nlog_dir = "{runtime_dir}/mine"\n[agents.a]\ncommand = ["true"]\n'
    assert load(write(tmp_path, text)).daemon.log_dir == f"{tmp_path}/run/agentd/mine"
    monkeypatch.delenv("LOGS_DIRECTORY")  # outside systemd: <runtime_dir>/log
    assert load(write(tmp_path, '[agents.a]\ncommand = ["true"]\n')).daemon.log_dir == (
        f"{tmp_path}/run/agentd/log"
    )


def test_a_config_that_says_nothing_gets_the_specs_defaults(tmp_path: Path) -> None:
    """spec.py holds every default once: an unset key means exactly what it says there."""
    from agentd.daemon.spec import AgentSpec, SupervisorSpec

    spec = load(write(tmp_path, '[daemon]\nruntime_dir = "run"\n[agents.a]\ncommand = ["true"]\n'))
    assert spec.agents["a"] == AgentSpec(name="a", pool=None, argv=("true",), bus_agent=False)
    assert spec.supervisors["root"] == SupervisorSpec(name="root", children=("a",))
    given = {"runtime_dir", "log_dir", "control", "bus", "state_dir"}  # derived, not defaults
    unset = {f: v for f, v in msgspec.structs.asdict(spec.daemon).items() if f not in given}
    assert unset == {
        f.name: f.default for f in msgspec.structs.fields(type(spec.daemon)) if f.name in unset
    }


@pytest.mark.parametrize(
    "daemon",
    [
        "",
        'runtime_dir = "run"\n',
        'runtime_dir = "run"\ncontrol = "ipc://{runtime_dir}/c.sock"\nbus = "ipc://b.sock"\n',
        'control = "tcp://127.0.0.1:5555"\nkeys_dir = "{runtime_dir}/keys"\n',
    ],
)
def test_ctl_finds_the_endpoints_the_daemon_serves(tmp_path: Path, daemon: str) -> None:
    """ctl reads the raw config (no validation) and must land where the daemon binds."""
    from agentd.daemon.ctl import Ctl

    path = write(tmp_path / "etc", f'[daemon]\n{daemon}[agents.a]\ncommand = ["true"]\n')
    spec = load(path).daemon
    settings = Ctl(str(path)).settings()
    assert (settings["control"], settings["bus"]) == (spec.control, spec.bus)
    assert settings["keys_dir"] == (spec.keys_dir or "")


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
    path = write(tmp_path, f'[agents.a]\ncommand = ["true"]\nack = true\n{key} = {value}\n')
    found = errors(path)
    assert any(e.startswith(f"{path}:4: ") and key in e and needle in e for e in found), found


def test_durable_delivery_bounds_are_inclusive(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path,
            '[agents.lo]\ncommand = ["true"]\nmax_deliveries = 1\nmax_in_flight = 1\n'
            "max_pending = 1\nretry_backoff = 0.001\n"
            '[agents.hi]\ncommand = ["true"]\nmax_deliveries = 1000\nmax_in_flight = 100000\n'
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
            '[agents.w]\ncommand = ["true"]\nack = true\nreplicas = 2\nmax_deliveries = 3\n'
            "retry_backoff = 2\nmax_in_flight = 7\nmax_pending = 50\n"
            '[agents.plain]\ncommand = ["true"]\n',
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


# --- bounds on every count and size (SPEC §11) ---------------------------------------------

# (BOUNDS key, a value just past the low end, the lowest accepted, the highest accepted, a
# value just past the high end). The numbers are the contract, written out on purpose; the
# test below makes sure a bound added to the table is added here too.
EDGES = [
    ("daemon.shutdown_timeout", "-0.5", "0", "86400", "86400.5"),
    ("daemon.log_max_bytes", "1023", "1024", "1099511627776", "1099511627777"),
    ("daemon.log_backups", "-1", "0", "1000", "1001"),
    ("daemon.memory_check_interval", "0.04", "0.05", "3600", "3601"),
    ("daemon.max_frame", "1023", "1024", "268435456", "268435457"),
    ("daemon.event_history", "0", "1", "1000000", "1000001"),
    ("supervisor.max_restarts", "-1", "0", "10000", "10001"),
    ("supervisor.max_seconds", "0", "0.001", "86400", "86401"),
    ("supervisor.max_children", "0", "1", "100000", "100001"),
    ("agent.replicas", "-1", "0", "100000", "100001"),
    ("agent.shutdown", "-1", "0", "86400", "86401"),
    ("agent.heartbeat", "0", "0.001", "86400", "86401"),
    ("agent.start_seconds", "-1", "0", "3600", "3601"),
    ("agent.restart_delay", "-0.5", "0", "3600", "3601"),
    ("agent.max_deliveries", "0", "1", "1000", "1001"),
    ("agent.retry_backoff", "0", "0.001", "30", "30.5"),
    ("agent.max_in_flight", "0", "1", "100000", "100001"),
    ("agent.max_pending", "0", "1", "10000000", "10000001"),
    ("agent.limits.memory_mb", "-1", "0", "16777216", "16777217"),
    ("agent.limits.nofile", "-1", "0", "1048576", "1048577"),
    ("agent.limits.cpu_seconds", "-1", "0", "31536000", "31536001"),
    ("agent.limits.pids", "-1", "0", "4194304", "4194305"),
    ("agent.limits.cpu_percent", "-1", "0", "102400", "102401"),
]
FLOAT_KEYS = {
    "daemon.shutdown_timeout",
    "daemon.memory_check_interval",
    "supervisor.max_seconds",
    "agent.shutdown",
    "agent.heartbeat",
    "agent.start_seconds",
    "agent.restart_delay",
    "agent.retry_backoff",
}


def config_setting(key: str, value: str) -> tuple[str, int, str]:
    """A config that sets BOUNDS `key` to `value`: (text, the line it is on, its dotted name)."""
    section, _, attr = key.partition(".")
    if section == "daemon":
        return f"[daemon]\n{attr} = {value}\n", 2, key
    if key == "supervisor.max_children":  # a dynamic supervisor's key only
        text = f'[supervisors.s]\nstrategy = "dynamic"\ntemplate = "a"\n{attr} = {value}\n'
        return text + '[agents.a]\ncommand = ["true"]\n', 4, f"supervisors.s.{attr}"
    if section == "supervisor":
        agent = '[agents.a]\ncommand = ["true"]\n'
        text = f'[supervisors.s]\nchildren = ["a"]\n{attr} = {value}\n{agent}'
        return text, 3, f"supervisors.s.{attr}"
    if attr.startswith("limits."):
        inner = attr.partition(".")[2]
        return (
            f'[agents.a]\ncommand = ["true"]\nlimits = {{ {inner} = {value} }}\n',
            3,
            f"agents.a.{attr}",
        )
    return f'[agents.a]\ncommand = ["true"]\n{attr} = {value}\n', 3, f"agents.a.{attr}"


def test_every_bound_in_the_table_is_tested() -> None:
    from agentd.daemon.config import BOUNDS

    assert {key for key in BOUNDS if not key.startswith("tree.")} == {e[0] for e in EDGES}


@pytest.mark.parametrize(
    ("key", "value"),
    [(key, low) for key, low, *_ in EDGES]
    + [(key, high) for key, *_, high in EDGES]
    + [(key, "nan") for key in sorted(FLOAT_KEYS)]
    + [(key, "inf") for key in sorted(FLOAT_KEYS)],
)
def test_a_value_past_its_bound_is_an_error_at_its_line(
    tmp_path: Path, key: str, value: str
) -> None:
    text, line, dotted = config_setting(key, value)
    path = write(tmp_path, text)
    found = errors(path)
    assert any(
        e.startswith(f"{path}:{line}: {dotted}: must be ") and "(got " in e for e in found
    ), found


@pytest.mark.parametrize(("key", "lowest", "highest"), [(e[0], e[2], e[3]) for e in EDGES])
def test_bounds_are_inclusive(tmp_path: Path, key: str, lowest: str, highest: str) -> None:
    for value in (lowest, highest):
        load(write(tmp_path, config_setting(key, value)[0]))


def test_the_root_supervisor_is_bounded_too(tmp_path: Path) -> None:
    path = write(tmp_path, "[supervisor]\nmax_seconds = 0\nmax_restarts = 100000\n")
    found = errors(path)
    assert any(e.startswith(f"{path}:2: supervisor.max_seconds: must be > 0") for e in found)
    assert any(e.startswith(f"{path}:3: supervisor.max_restarts: must be between") for e in found)


def test_a_number_past_any_bound_names_its_value_briefly(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.a]\ncommand = ["true"]\nreplicas = 1' + "0" * 30 + "\n")
    assert errors(path) == [
        f"{path}:3: agents.a.replicas: must be between 0 and 100000 (got a 31-digit number)"
    ]


def test_an_int_literal_python_will_not_parse_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[agents.a]\ncommand = ["true"]\nreplicas = 1' + "0" * 5000 + "\n")
    found = errors(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:3: "), found


def test_absurd_replicas_is_refused_before_any_member_is_built(tmp_path: Path) -> None:
    """`replicas = 100000000` once built 10^8 members (11 GB). It must fail first.

    A trace hook trips on the first call into expansion, so this test fails (at once) if
    members are built for the rejected pool; the control shows the tripwire does trip.
    """
    from agentd.daemon import config

    expansion = {config._expand.__code__, config.pool_member.__code__}

    def tripwire(frame: object, event: str, arg: object) -> None:
        if event == "call" and frame.f_code in expansion:  # type: ignore[attr-defined]
            raise RuntimeError(f"expansion started: {frame.f_code.co_name}")  # type: ignore[attr-defined]

    def load_tripwired(path: Path) -> object:
        previous = sys.gettrace()
        sys.settrace(tripwire)
        try:
            return load(path)
        finally:
            sys.settrace(previous)

    text = '[agents.a]\ncommand = ["true"]\n[agents.w]\ncommand = ["true"]\nreplicas = 100000000\n'
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tripwired(path)
    assert [str(i) for i in info.value.issues] == [
        f"{path}:5: agents.w.replicas: must be between 0 and 100000 (got 100000000)"
    ]
    with pytest.raises(RuntimeError, match="expansion started"):  # the control
        load_tripwired(write(tmp_path, text.replace("100000000", "2"), "ok.toml"))


def test_check_answers_absurd_replicas_with_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, '[agents.w]\ncommand = ["true"]\nreplicas = 100000000\n')
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: agents.w.replicas: must be between 0 and 100000" in result.stderr


def test_instances_in_all_are_bounded_across_pools_and_files(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        'include = ["d/*.toml"]\n[agents.w]\ncommand = ["true"]\nreplicas = 60000\n',
    )
    drop = write(
        tmp_path,
        '[agents.single]\ncommand = ["true"]\n[agents.v]\ncommand = ["true"]\nreplicas = 40000\n',
        "d/v.toml",
    )
    found = errors(main)
    assert found == [
        f"{drop}:5: agents.v: 100001 agent instances in all up to here (a pool counts each "
        "member), more than the 100000 allowed",
        f"{main}: supervisor: 100001 children (a pool counts each member), more than the "
        "100000 allowed",
    ]


def test_a_full_size_pool_is_fine(tmp_path: Path) -> None:
    spec = load(write(tmp_path, '[agents.w]\ncommand = ["true"]\nreplicas = 100000\n'))
    assert len(spec.agents) == 100_000 and spec.pools["w"].replicas == 100_000


def test_children_per_supervisor_are_bounded(tmp_path: Path) -> None:
    """A full-size pool and one more child: the instances fit, the supervisor's children not."""
    path = write(
        tmp_path,
        '[supervisors.s]\nchildren = ["w", "t"]\n[supervisors.t]\nchildren = []\n'
        '[agents.w]\ncommand = ["true"]\nreplicas = 100000\n',
    )
    assert errors(path) == [
        f"{path}:2: supervisors.s: 100001 children (a pool counts each member), more than the "
        "100000 allowed"
    ]


def test_supervisors_in_all_are_bounded(tmp_path: Path) -> None:
    tables = "".join(f"[supervisors.s{i}]\nchildren = []\n" for i in range(10_000))
    path = write(tmp_path, tables)
    last = 2 * 9_999 + 1  # the 10,000th named one makes 10,001 with the root
    assert errors(path) == [
        f"{path}:{last}: supervisors.s9999: 10001 supervisors in all (the root included), "
        "more than the 10000 allowed"
    ]


def nested(depth: int) -> str:
    """Supervisors s1 .. sDEPTH, each the only child of the one before, an agent at the end."""
    text = "".join(
        f'[supervisors.s{i}]\nchildren = ["{f"s{i + 1}" if i < depth else "a"}"]\n'
        for i in range(1, depth + 1)
    )
    return text + '[agents.a]\ncommand = ["true"]\n'


def test_nesting_depth_is_bounded(tmp_path: Path) -> None:
    spec = load(write(tmp_path, nested(32)))
    assert spec.supervisors["s32"].children == ("a",)
    path = write(tmp_path, nested(40))
    assert errors(path) == [  # one issue for the branch, at the first level past the bound
        f"{path}:65: supervisors.s33: 33 supervisors deep below root (itself included), "
        "more than the 32 allowed"
    ]


def test_a_cycle_is_still_reported_with_depth_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[supervisor]\nchildren = ["x"]\n[supervisors.x]\nchildren = ["y"]\n'
        '[supervisors.y]\nchildren = ["x"]\n',
    )
    assert any("cycle" in e for e in errors(path))


def test_names_are_bounded(tmp_path: Path) -> None:
    load(write(tmp_path, f'[agents.{"a" * 128}]\ncommand = ["true"]\n'))
    path = write(tmp_path, f'[agents.{"a" * 129}]\ncommand = ["true"]\n')
    assert errors(path) == [
        f"{path}:1: agents.{'a' * 40}...: 129 characters in the name, more than the 128 allowed"
    ]


def test_a_pool_of_none_builds(tmp_path: Path) -> None:
    """replicas = 0 is a pool scaled to nothing (it used to crash the loader)."""
    spec = load(
        write(
            tmp_path,
            '[supervisors.s]\nchildren = ["w"]\n[agents.w]\ncommand = ["true"]\nreplicas = 0\n',
        )
    )
    assert spec.pools["w"].replicas == 0 and spec.pools["w"].supervisor == "s"
    assert spec.supervisors["s"].children == () and not spec.agents


@pytest.mark.parametrize("pattern", ["a..b", "", "a.", ".a", "."])
def test_empty_pattern_segments_are_errors(tmp_path: Path, pattern: str) -> None:
    path = write(tmp_path, f'[agents.a]\ncommand = ["true"]\nsubscribe = ["ok.*", "{pattern}"]\n')
    assert errors(path) == [
        f'{path}:3: agents.a.subscribe: "{pattern}" is not a pattern: its dot-separated '
        "segments must not be empty"
    ]


def test_wildcard_patterns_are_fine(tmp_path: Path) -> None:
    spec = load(write(tmp_path, '[agents.a]\ncommand = ["true"]\nsubscribe = ["a.*", "**", "b"]\n'))
    assert spec.agents["a"].subscribe == ("a.*", "**", "b")


def test_an_include_without_a_wildcard_must_name_a_file(tmp_path: Path) -> None:
    main = write(
        tmp_path,
        'include = ["extra.tmol", "none.d/*.toml", "d"]\n[agents.a]\ncommand = ["true"]\n',
    )
    (tmp_path / "d").mkdir()
    assert errors(main) == [
        f'{main}:1: include: "extra.tmol" names no file ({tmp_path}/extra.tmol); only a glob '
        "may match nothing",
        f'{main}:1: include: "d" is not a file ({tmp_path}/d); for a directory use "d/*.toml"',
    ]
    write(tmp_path, '[agents.b]\ncommand = ["true"]\n', "extra.tmol")
    (tmp_path / "d").rmdir()
    write(tmp_path, '[agents.c]\ncommand = ["true"]\n', "d")  # a file named d: fine
    assert set(load(main).agents) == {"a", "b", "c"}


def test_a_missing_include_in_a_drop_in_names_the_drop_in(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["d/*.toml"]\n')
    drop = write(tmp_path, '\ninclude = ["/no/such/agentd.toml"]\n', "d/x.toml")
    assert errors(main) == [
        f'{drop}:2: include: "/no/such/agentd.toml" names no file (/no/such/agentd.toml); '
        "only a glob may match nothing"
    ]


def test_a_glob_skips_directories(tmp_path: Path) -> None:
    main = write(tmp_path, 'include = ["d/*"]\n[agents.a]\ncommand = ["true"]\n')
    (tmp_path / "d" / "sub.toml").mkdir(parents=True)
    assert set(load(main).agents) == {"a"}


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ('command = ["x\\u0000y"]', "agents.a.command: must not contain a NUL byte"),
        ('command = ["true"]\nenv = { A = "\\u0000" }', "agents.a.env: must not contain a NUL"),
        ('command = ["true"]\nenv = { "A=B" = "1" }', "agents.a.env: `A=B` is not a variable name"),
        ('command = ["true"]\nenv = { "" = "1" }', "agents.a.env: `` is not a variable name"),
        ('command = ["true"]\ncwd = "/tmp\\u0000"', "agents.a.cwd: must not contain a NUL byte"),
    ],
)
def test_strings_exec_cannot_carry_are_errors(tmp_path: Path, setting: str, needle: str) -> None:
    path = write(tmp_path, f"[agents.a]\n{setting}\n")
    found = errors(path)
    assert any(e.startswith(f"{path}:") and needle in e for e in found), found


def test_otp_keys_reach_the_spec(tmp_path: Path) -> None:
    spec = load(
        write(
            tmp_path,
            '[supervisor]\nauto_shutdown = "all_significant"\n'
            '[supervisors.s]\nrestart = "transient"\nsignificant = true\nshutdown = "infinity"\n'
            'children = ["a"]\n'
            '[agents.a]\ncommand = ["true"]\nrestart = "temporary"\nsignificant = true\n'
            'shutdown = "infinity"\n',
        )
    )
    assert spec.supervisors["root"].auto_shutdown == "all_significant"
    assert spec.supervisors["s"].significant and not spec.supervisors["root"].significant
    assert spec.agents["a"].significant and spec.agents["a"].shutdown == math.inf


# --- command[0] must resolve, as the runtime resolves it (SPEC §11) ---------------------


@pytest.mark.parametrize(
    ("command", "needle"),
    [
        ('["/nonexistent/agent"]', '"/nonexistent/agent": no such executable'),
        ('["{tmp}/plain.txt"]', 'plain.txt": no such executable'),  # not executable
        ('["{tmp}"]', "no such executable"),  # a directory
        ('["no-such-agent-xyz", "-v"]', '"no-such-agent-xyz": not found on PATH ('),
        ('["bin/agent"]', '"bin/agent": no such executable'),  # relative to cwd: not there
    ],
)
def test_a_command_that_does_not_resolve_is_an_error_at_its_line(
    tmp_path: Path, command: str, needle: str
) -> None:
    (tmp_path / "plain.txt").write_text("not a program\n")
    text = f"[agents.a]\nstart_seconds = 0\ncommand = {command.format(tmp=tmp_path)}\n"
    path = write(tmp_path, text)
    found = errors(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:3: agents.a.command: "), found
    assert needle in found[0], found


def test_a_command_resolves_on_the_agents_own_path_and_cwd(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "agent").write_text("#!/bin/sh\n")
    (bin_dir / "agent").chmod(0o755)
    text = (
        f'[agents.a]\ncommand = ["agent"]\nenv = {{ PATH = "{bin_dir}" }}\n'
        f'[agents.b]\ncommand = ["bin/agent"]\ncwd = "{tmp_path}"\n'
        '[agents.c]\ncommand = ["sh", "-c", "true"]\n'  # the daemon's own PATH
    )
    spec = load(write(tmp_path, text))
    assert spec.agents["a"].argv == ("agent",)  # resolved again at spawn, as written
