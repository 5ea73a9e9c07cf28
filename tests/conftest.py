"""Shared fixtures: real daemons in temp dirs, and a check that nothing is left behind."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

PROGS = Path(__file__).parent / "progs"
REC = PROGS / "rec.py"

#: Files whose tests load both cores by themselves (floods, chaos, a wheel build):
#: under pytest-xdist they run one after another on one worker, next to the light ones.
HEAVY_FILES = frozenset(
    {"test_durable.py", "test_hub_chaos.py", "test_packaging.py", "test_bus_fuzz.py"}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the heavy tests (for `--dist loadgroup`); the rest spread over the workers."""
    for item in items:
        if item.get_closest_marker("slow") or item.path.name in HEAVY_FILES:
            item.add_marker(pytest.mark.xdist_group("heavy"))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rec(directory: Path, *flags: str) -> str:
    """A `command = [...]` TOML value running the recording test agent."""
    argv = [sys.executable, str(REC), str(directory), *flags]
    return json.dumps(argv)


class DaemonProc:
    """`agentd run` as a real subprocess, with its JSON event lines collected."""

    def __init__(self, tmp: Path, config: str, name: str = "agentd.toml") -> None:
        self.tmp = tmp
        self.dir = tmp / "rec"
        self.dir.mkdir(exist_ok=True)
        self.runtime_dir = tmp / "run"
        # Never the real /var/lib/agentd (tests run as root in CI): a state dir of our own.
        self.state_dir = tmp / "state"
        body = textwrap.dedent(config)
        if "[daemon]" in body:
            body = body.replace("[daemon]\n", "")
        self.config = tmp / name
        self.config.write_text(self._head(body) + body)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.popen: subprocess.Popen[str] | None = None
        self.seen_pids: set[int] = set()

    def start(self, wait_ready: bool = True, extra_env: dict[str, str] | None = None) -> DaemonProc:
        env = dict(os.environ, **(extra_env or {}))
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentd.daemon.cli",
                "run",
                "--config",
                str(self.config),
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready:
            self.wait_event("daemon.ready", timeout=20)
        return self

    def _read(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.raw.append(line)
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record.get("pid"), int) and record.get("event", "").startswith(
                    "agent."
                ):
                    self.seen_pids.add(record["pid"])
                self.lines.append(record)
                self._cond.notify_all()

    @staticmethod
    def _is(record: dict[str, Any], event: str | None, agent: str | None) -> bool:
        return (event is None or record.get("event") == event) and (
            agent is None or record.get("agent") == agent
        )

    def events(self, event: str | None = None, agent: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.lines if self._is(r, event, agent)]

    def wait_event(
        self,
        event: str,
        agent: str | None = None,
        count: int = 1,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] = lambda r: True,
    ) -> dict[str, Any]:
        """The `count`th matching record, waiting on the reader's Condition until the deadline."""
        matches: list[dict[str, Any]] = []
        scanned = 0

        def found() -> dict[str, Any] | None:
            nonlocal scanned  # each wake-up looks only at the lines that came since the last
            for record in self.lines[scanned:]:
                if self._is(record, event, agent) and where(record):
                    matches.append(record)
            scanned = len(self.lines)
            return matches[count - 1] if len(matches) >= count else None

        with self._cond:
            record = self._cond.wait_for(found, timeout)
        if record is None:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {count}x {event} {agent or ''}"
                f"\n--- daemon log, last lines:\n{self.tail()}"
            )
        return record

    def tail(self, n: int = 15) -> str:
        with self._cond:
            return "".join(self.raw[-n:])

    def pid(self, agent: str) -> int:
        """PID of the agent's latest ready incarnation."""
        return self.events("agent.ready", agent)[-1]["pid"]

    def pids(self, agents: list[str]) -> dict[str, int]:
        return {a: self.pid(a) for a in agents}

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> int:
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else 0
        self.signal(signal.SIGTERM)
        return self.wait()

    def cleanup(self) -> list[int]:
        """Kill whatever is left; return the PIDs that were still alive."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        pids = set(self.seen_pids)
        for path in self.dir.glob("*.grandchild"):
            pids.update(int(x) for x in path.read_text().split())
        try:
            wait_for(lambda: not any(alive(p) for p in pids), 5, "agents to be gone")
        except AssertionError:
            pass
        left = [p for p in pids if alive(p)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `agentd ctl --config <ours> ARGS` and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ctl_json(self, *args: str) -> Any:
        result = self.ctl(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def _head(self, body: str) -> str:
        """Our [daemon] table's start: runtime_dir, and state_dir unless the test sets one.

        AGENTD_TEST_CGROUP=off | fallback runs the tests without cgroups (SPEC §11):
        `cgroup = "off"`, or a cgroup_root outside any cgroup file system, which is
        what `auto` meets on a host with no writable tree.
        """
        head = f'[daemon]\nruntime_dir = "{self.runtime_dir}"\n'
        if not re.search(r"^\s*state_dir\s*=", body, re.M):
            head += f'state_dir = "{self.state_dir}"\n'
        mode = os.environ.get("AGENTD_TEST_CGROUP", "")
        if mode and not re.search(r"^\s*cgroup(_root)?\s*=", body, re.M):
            if mode == "off":
                head += 'cgroup = "off"\n'
            elif mode == "fallback":
                head += f'cgroup_root = "{self.tmp}"\n'
        return head

    def rewrite(self, config: str) -> None:
        """Replace the config file (keeping our [daemon] runtime_dir and state_dir)."""
        body = textwrap.dedent(config)
        self.config.write_text(self._head(body) + body)

    def started(self) -> list[tuple[str, int, int]]:
        path = self.dir / "started"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            name, pid, inc = line.split()
            out.append((name, int(pid), int(inc)))
        return out

    def term_order(self) -> list[str]:
        path = self.dir / "term"
        return path.read_text().split() if path.exists() else []


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    made: list[DaemonProc] = []

    def make(config: str, name: str = "agentd.toml") -> DaemonProc:
        d = DaemonProc(tmp_path, config, name)
        made.append(d)
        return d

    yield make
    leftovers = [pid for d in made for pid in d.cleanup()]
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[Any]:
    """A real broker process and the daemon's link to it, without a daemon (conftest_bus)."""
    from tests.conftest_bus import Bus

    b = Bus(tmp_path)
    try:
        yield b
    finally:
        b.close()


# --- Node.js and the npm packages of the example worker -----------------------------

NODE_DIR = Path(__file__).resolve().parent.parent / "agents" / "examples" / "node"


def _node_modules_load(node: str) -> subprocess.CompletedProcess[str]:
    probe = "require('zeromq'); require('@msgpack/msgpack')"
    return subprocess.run(
        [node, "-e", probe], cwd=NODE_DIR, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="session")
def node_worker() -> str:
    """`node`, with the worker's npm packages installed (`npm ci` once, if missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "the mixed-stack tests need Node.js (>= 18) and npm on PATH: "
            "install them (e.g. apt-get install nodejs npm), then re-run"
        )
    # One `npm ci` at a time: pytest-xdist workers each set up this fixture.
    with open(NODE_DIR / ".npm-ci.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _node_modules_load(node).returncode != 0:
            installed = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if installed.returncode != 0:
                out = f"{installed.stdout}\n{installed.stderr}"
                pytest.fail(f"`npm ci` in {NODE_DIR} failed:\n{out}")
    probe = _node_modules_load(node)
    if probe.returncode != 0:
        pytest.fail(f"zeromq / @msgpack/msgpack do not load under {node}:\n{probe.stderr}")
    return node
