"""Config validation: every mistake is named by file and line, and nothing starts."""

from __future__ import annotations

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
