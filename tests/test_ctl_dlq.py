"""`agentd ctl dlq` list / redrive / purge against a live daemon, its broker and its journal.

The agent is `tests.bus_agents:Worker` with `ack = true`: its `work.fail`
handler always raises, so a `work.fail` signal (not a request) is a failed
delivery every time, retried after `retry_backoff` until `max_deliveries`,
then dead-lettered (SPEC §10).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import DaemonProc, wait_for

ROOT = Path(__file__).resolve().parent.parent


def config(state_dir: Path) -> str:
    return f"""
[daemon]
state_dir = "{state_dir}"
[agents.failer]
module = "tests.bus_agents:Worker"
cwd = "{ROOT}"
ack = true
max_deliveries = 2
retry_backoff = 0.05
"""


def letters(d: DaemonProc, *args: str) -> list[dict[str, Any]]:
    """`ctl dlq [ARGS] --json`, checked for its exact shape."""
    out = d.ctl_json("dlq", *args)
    assert list(out) == ["dead_letters"], out
    for letter in out["dead_letters"]:
        assert list(letter) == [
            "id",
            "agent",
            "type",
            "source",
            "deliveries",
            "error",
            "time",
        ], letter
    return out["dead_letters"]


def failures(d: DaemonProc) -> int:
    """How many times the handler has raised, by the agent's own log."""
    result = d.ctl("logs", "failer", "-n", "10000")
    assert result.returncode == 0, result.stderr
    return result.stdout.count("agent.handler_failed")


def dead(d: DaemonProc, after: float = 0.0) -> dict[str, Any] | None:
    """The single dead letter, once it is there (dead-lettered later than `after`)."""
    found = letters(d)
    if len(found) == 1 and found[0]["time"] > after:
        return found[0]
    assert len(found) <= 1, found
    return None


def restart(daemon_factory, d: DaemonProc, state_dir: Path) -> DaemonProc:
    """SIGTERM the daemon (a clean stop), then a new one on the same config and state_dir."""
    assert d.stop() == 0
    return daemon_factory(config(state_dir)).start()


def test_dead_letter_list_redrive_purge_across_restarts(daemon_factory, tmp_path) -> None:
    state_dir = tmp_path / "state"
    d = daemon_factory(config(state_dir)).start()
    assert letters(d) == []
    assert d.ctl("dlq").stdout.strip() == "no dead letters"

    sent = time.time()
    result = d.ctl("send", "failer", "work.fail", '"x"')
    assert result.returncode == 0, result.stderr
    letter = wait_for(lambda: dead(d), 20, "the signal in the dead-letter queue")
    assert letter["agent"] == "failer" and letter["type"] == "work.fail"
    assert letter["source"].startswith("ctl-")
    assert letter["deliveries"] == 2
    assert "cannot do x" in letter["error"]
    assert letter["time"] >= sent
    wait_for(lambda: failures(d) == 2, 10, "two handler failures logged")  # max_deliveries
    # A handler that raises is a failed delivery, not a crash: the agent was not restarted.
    assert d.ctl_json("status", "failer")["agents"][0]["restarts"] == 0
    note = d.wait_event("bus.dead_lettered")
    assert letter["id"] in json.dumps(note)
    assert (state_dir / "bus.journal").exists()

    # The filter and the table.
    assert [x["id"] for x in letters(d, "failer")] == [letter["id"]]
    table = d.ctl("dlq")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "AGENT", "TYPE", "DELIVERIES", "AGE"]
    assert lines[1].split()[:4] == [letter["id"], "failer", "work.fail", "2"]
    assert lines[2].startswith("    from ctl-") and "cannot do x" in lines[2]
    assert all(len(line) <= 80 for line in lines)

    # A clean stop and a new daemon: the dead letter is still there, as it was.
    d = restart(daemon_factory, d, state_dir)
    assert letters(d) == [letter]

    # Redrive: delivered again with the count reset, fails twice more, comes back.
    result = d.ctl("dlq", "redrive", "failer", "--id", letter["id"], "--json")
    assert result.returncode == 0, result.stderr
    moved = json.loads(result.stdout)["dead_letters"]
    assert [x["id"] for x in moved] == [letter["id"]]
    again = wait_for(lambda: dead(d, after=letter["time"]), 20, "the redriven signal back")
    assert again["id"] == letter["id"] and again["deliveries"] == 2
    assert "cannot do x" in again["error"]
    # Two more runs (the log file is the same across daemons): the count started again.
    wait_for(lambda: failures(d) == 4, 10, "two more handler failures logged")

    # An --id that matches nothing, or an agent nobody configured, is a refusal.
    result = d.ctl("dlq", "purge", "--id", "no-such-id")
    assert result.returncode == 1 and "no dead letter with id no-such-id" in result.stderr
    result = d.ctl("dlq", "nobody")
    assert result.returncode == 1 and "nobody" in result.stderr
    # Purge drops the letter for good.
    assert [x["id"] for x in letters(d)] == [letter["id"]]
    result = d.ctl("dlq", "purge", "failer")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "purged 1 dead letter"
    assert letters(d) == []
    assert d.ctl("dlq", "redrive").stdout.strip() == "redrove 0 dead letters"

    # ... and it stays gone after another restart.
    d = restart(daemon_factory, d, state_dir)
    assert letters(d) == []


def test_dlq_usage_errors_exit_2(tmp_path) -> None:
    conf = tmp_path / "agentd.toml"
    conf.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/run"\n')
    base = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(conf)]
    for args in (["dlq", "a", "b"], ["dlq", "redrive", "--id"], ["dlq", "purge", "--bogus"]):
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=10)
        assert result.returncode == 2, (args, result.stderr)


def test_dlq_without_a_daemon_exits_3(tmp_path) -> None:
    conf = tmp_path / "agentd.toml"
    conf.write_text(f'[daemon]\nruntime_dir = "{tmp_path}/run"\n')
    (tmp_path / "run").mkdir()
    base = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(conf)]
    cases = (
        ["dlq"],
        ["dlq", "--json"],
        ["dlq", "worker"],
        ["dlq", "--", "redrive"],  # an agent named like the verb
        ["dlq", "redrive", "worker", "--id", "x"],
        ["dlq", "purge"],
    )
    for args in cases:
        t0 = time.monotonic()
        result = subprocess.run(base + args, capture_output=True, text=True, timeout=10)
        assert result.returncode == 3 and "no agentd bus" in result.stderr, (args, result.stderr)
        assert time.monotonic() - t0 < 2.0
    # A stale socket file with nobody behind it: the probe gives up within 2 s.
    (tmp_path / "run" / "bus.sock").touch()
    t0 = time.monotonic()
    result = subprocess.run([*base, "dlq"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 3 and "no agentd bus answering" in result.stderr
    assert time.monotonic() - t0 < 2.0
