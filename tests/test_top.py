"""`agentd ctl top`: the picture as a pure function, then the real thing under tmux.

The rendering tests draw frames to text with no terminal. The live tests run
`agentd ctl top` in a detached tmux session of 80x24 on a private tmux server,
read the pane with `capture-pane`, type keys with `send-keys`, against a real
daemon whose agents they kill.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from agentd.daemon.ctl import TOP_SORT_KEYS
from agentd.daemon.top import (
    CHROME,
    KEYS_HELP,
    Frame,
    View,
    fit_columns,
    outline,
    press,
    render,
    sort_key,
)
from tests.conftest import DaemonProc, rec, wait_for

# --- the picture, pure ------------------------------------------------------------------


def agent(name: str, **status: Any) -> dict[str, Any]:
    return {"name": name, "type": "agent", "state": status.get("state", "running")}


def supervisor(name: str, *children: dict[str, Any], state: str = "running") -> dict[str, Any]:
    return {"name": name, "type": "supervisor", "state": state, "children": list(children)}


TREE = supervisor(
    "root",
    agent("ingress"),
    supervisor("workers", agent("worker@2"), agent("worker@10"), agent("worker@1")),
    agent("audit"),
)
MiB = 2**20
STATUS = [  # as `status --json` sends them: no held / in_flight keys yet on two of them
    {"name": "ingress", "state": "running", "restarts": 0, "rss": 30 * MiB, "cpu": 1.0},
    {"name": "worker@2", "state": "running", "restarts": 4, "rss": 90 * MiB, "cpu": 7.5,
     "in_flight": 3, "held": 0},
    {"name": "worker@10", "state": "backoff", "restarts": 9, "rss": None, "cpu": None,
     "in_flight": 0, "held": 12},
    {"name": "worker@1", "state": "running", "restarts": 1, "rss": 20 * MiB, "cpu": 0.5,
     "in_flight": 1, "held": 0},
    {"name": "audit", "state": "failed", "restarts": 3, "rss": None, "cpu": None},
    {"name": "bus", "state": "running", "restarts": 0, "rss": 40 * MiB, "cpu": 0.2,
     "supervisor": None},
]  # fmt: skip


def names(sort: str, reverse: bool = False) -> list[str]:
    return [r.name for r in outline(TREE, STATUS, sort, reverse)]


def draw(frame: Frame, view: View, width: int = 80, height: int | None = None, **kw: Any) -> str:
    """The frame as a terminal of that width would show it (no colours)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(
        render(frame, view, width, height, **kw)
    )
    return out.getvalue().removesuffix("\n")


def frame(**kw: Any) -> Frame:
    return Frame(TREE, STATUS, "ipc:///run/agentd/control.sock", "12:00:00", **kw)


def test_tree_order_and_sums() -> None:
    rows = outline(TREE, STATUS, "name")
    assert [r.name for r in rows] == [
        "root", "audit", "ingress", "workers", "worker@1", "worker@2", "worker@10", "bus",
    ]  # fmt: skip
    by = {r.name: r for r in rows}
    # A supervisor sums its subtree: what is unknown (null, or not sent) is left out.
    assert (by["workers"].restarts, by["workers"].rss, by["workers"].held) == (14, 110 * MiB, 12)
    assert by["workers"].cpu == pytest.approx(8.0) and by["workers"].in_flight == 4
    assert (by["root"].restarts, by["root"].rss) == (17, 140 * MiB)
    assert by["ingress"].held is None and by["ingress"].in_flight is None  # absent keys
    assert [len(r.lasts) for r in rows] == [0, 1, 1, 1, 2, 2, 2, 0]
    assert by["workers"].lasts == (True,) and by["worker@10"].lasts == (True, True)
    assert not by["bus"].in_tree and by["bus"].lasts == ()


def test_every_sort_key_orders_the_siblings() -> None:
    assert set(TOP_SORT_KEYS) == {"name", "state", "restarts", "rss", "cpu", "in_flight", "held"}
    assert names("state") == [
        "root", "audit", "workers", "worker@10", "worker@1", "worker@2", "ingress", "bus",
    ]  # trouble first  # fmt: skip
    assert names("restarts")[1:4] == ["workers", "worker@10", "worker@2"]
    assert names("rss")[1:6] == ["workers", "worker@2", "worker@1", "worker@10", "ingress"]
    assert names("cpu")[1:3] == ["workers", "worker@2"]
    assert names("in_flight")[1:6] == ["workers", "worker@2", "worker@1", "worker@10", "audit"]
    assert names("held")[1:3] == ["workers", "worker@10"]
    assert names("name", reverse=True)[1:4] == ["workers", "worker@10", "worker@2"]
    assert names("held")[-1] == "bus"  # outside the tree: always last
    with pytest.raises(ValueError, match="unknown sort key"):
        sort_key("pid")


def test_keys_change_the_view() -> None:
    view = View()
    for expected in TOP_SORT_KEYS[1:] + TOP_SORT_KEYS[:1]:
        view = view.on_key("s")
        assert view.sort == expected
    assert View("name").on_key("S").sort == "held"
    assert View("rss").on_key("r") == View("rss", True)
    assert View("rss", True).on_key("r").on_key("x") == View("rss", False)
    assert View("rss", True).on_key("s") == View("cpu", False)
    assert press("ssr", View()) == View("restarts", True)
    assert press("s\x1b[Aq", View()) is None and press("", View("cpu")) == View("cpu")
    assert press("\x1bOS\x1b[1;5r\x1b[15~s", View()) == View("state")  # F4, ... are not keys


def test_eighty_columns_fit_and_say_everything() -> None:
    text = draw(frame(), View("name"))
    lines = text.split("\n")
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith("agentd top  ipc:///run/agentd/control.sock")
    assert lines[0].endswith("12:00:00") and len(lines[0]) == 80
    assert lines[1] == "5 agents: 1 failed, 1 backoff, 3 running   sort: name"
    assert lines[2].split() == ["NAME", "STATE", "RESTARTS", "RSS", "CPU%", "IN-FLIGHT", "HELD"]
    cells = {line.split()[-7].lstrip("├└─│ "): line.split()[-6:] for line in lines[3:]}
    assert cells["worker@2"] == ["running", "4", "90.0M", "7.5", "3", "0"]
    assert cells["worker@10"] == ["backoff", "9", "-", "-", "0", "12"]
    assert cells["ingress"] == ["running", "0", "30.0M", "1.0", "-", "-"]
    assert cells["workers"] == ["running", "14", "110.0M", "8.0", "4", "12"]
    assert "└─ workers" in text and "   ├─ worker@1" in text and "   └─ worker@10" in text


def test_long_names_are_clipped_and_narrow_screens_drop_columns() -> None:
    long = "summarizer-with-a-name-far-too-long-for-any-column"
    tree = supervisor("root", supervisor("pool", agent(long)))
    status = [{"name": long, "state": "running", "restarts": 2, "rss": 1, "cpu": 0.0}]
    wide = draw(Frame(tree, status, "ipc:///x"), View())
    assert max(len(line) for line in wide.split("\n")) <= 80
    assert "   └─ summarizer-with-a…  running" in wide  # NAME: 80 - 56 columns
    for width in (79, 60, 40, 30):
        text = draw(Frame(tree, status, "ipc:///x", "12:00:00"), View(), width)
        assert max(len(line) for line in text.split("\n")) <= width, (width, text)
        assert "running" in text
    name_width, columns = fit_columns(60)
    assert [c.header for c in columns] == ["STATE", "RESTARTS", "RSS", "CPU%"]
    assert name_width == 60 - (8 + 8 + 7 + 6) - 4 * 2
    assert "HELD" not in draw(frame(), View(), 60) and "CPU%" in draw(frame(), View(), 60)


def test_figures_fit_their_columns() -> None:
    from agentd.daemon.top import _count, _size

    assert [_size(v) for v in (None, 1, 512 * 1024, 98 * MiB, 3 * 2**30, 2**41)] == [
        "-", "0K", "512K", "98.0M", "3.0G", "2.0T",
    ]  # fmt: skip
    assert [_count(v, 6) for v in (None, 0, 999999, 1234567, 12_345_678_901)] == [
        "-", "0", "999999", "1234k", "12345M",
    ]  # fmt: skip


def test_height_bounds_the_rows_and_keys_sit_on_the_last_line() -> None:
    lines = draw(frame(keys=True), View(), 80, 24).split("\n")
    assert len(lines) == 24 and lines[-1].strip() == KEYS_HELP and "worker@10" in "\n".join(lines)
    short = draw(frame(keys=True), View(), 80, CHROME + 4).split("\n")
    assert len(short) == CHROME + 4
    assert short[-2] == "... 5 more (a taller window shows them)"  # 3 of the 8 rows shown
    assert [line.split()[0] for line in short[3:6]] == ["root", "├─", "├─"]
    exact = draw(frame(keys=True), View(), 80, CHROME + 8).split("\n")
    assert len(exact) == CHROME + 8 and "more" not in exact[-2]  # every row, no blank line
    assert len(draw(frame(), View(), 80, None).split("\n")) == 3 + 8  # no height: all rows


def test_a_problem_takes_the_summary_line_and_ascii_has_no_glyphs() -> None:
    lines = draw(frame(problem="no agentd answering (no reply): exit in 3s"), View()).split("\n")
    assert lines[1] == "no agentd answering (no reply): exit in 3s"
    plain = draw(frame(), View(), 80, None, unicode=False)
    assert plain.isascii() and "`- workers" in plain and "   |- worker@1" in plain
    empty = draw(Frame(None, [], "ipc:///x"), View())
    assert empty.split("\n")[1].startswith("0 agents: none")


# --- the real thing ---------------------------------------------------------------------

CONFIG = """
[supervisor]
children = ["alpha", "crew"]
[supervisors.crew]
children = ["beta", "gamma"]
[agents.alpha]
command = {rec}
start_seconds = 0
[agents.beta]
command = {rec}
start_seconds = 0
[agents.gamma]
command = {rec}
start_seconds = 0
"""
AGENTS = ("alpha", "beta", "gamma")
needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """One daemon for the module: alpha under root, beta and gamma under crew."""
    tmp = tmp_path_factory.mktemp("top")
    d = DaemonProc(tmp, CONFIG.format(rec=rec(tmp / "rec"))).start()
    yield d
    assert not d.cleanup(), "processes left behind"


def ctl_top(d: DaemonProc, *args: str) -> str:
    """The command line of `agentd ctl top` for d, for a shell."""
    argv = [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(d.config), "top"]
    return shlex.join([*argv, *args])


def test_one_frame_when_stdout_is_not_a_terminal(three: DaemonProc, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out = subprocess.run(
        ["sh", "-c", ctl_top(three, "--sort", "state")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.rstrip("\n").split("\n")
    assert max(len(line) for line in lines) <= 80 and "sort: state" in lines[1]
    assert [line.split()[-7].lstrip("├└─│ ") for line in lines[3:]] == [
        "root", "alpha", "crew", "beta", "gamma", "bus",
    ]  # fmt: skip
    assert "q: quit" not in out.stdout  # no keys to press
    missing = tmp_path / "none.toml"
    missing.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\n')
    gone = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(missing), "top"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert gone.returncode == 3 and "no agentd answering" in gone.stderr


class Tmux:
    """A private tmux server (its socket in the test's tmp dir) with an 80x24 session of bash."""

    def __init__(self, cwd: Path) -> None:
        self.socket = str(cwd / "tmux.sock")  # -S: gone with the tmp dir, as kill-server leaves it
        self.env = dict(os.environ, TERM="xterm-256color", LC_ALL="C.UTF-8", PS1="$ ")
        for key in ("COLUMNS", "LINES", "TMUX"):
            self.env.pop(key, None)
        self.tmux("new-session", "-d", "-x", "80", "-y", "24", "-s", "t", "-c", str(cwd),
                  "bash --norc --noprofile")  # fmt: skip
        self.tmux("set-option", "-t", "t", "status", "off")  # all 24 lines for the pane

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", self.socket, *args], capture_output=True, text=True, env=self.env
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", line)
        self.tmux("send-keys", "-t", "t", "Enter")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def screen(self) -> list[str]:
        """The pane's lines, a line the terminal wrapped joined again (-J)."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "t").split("\n")[:-1]

    def wait(self, check: Callable[[list[str]], Any], what: str, timeout: float = 10.0) -> Any:
        last: list[list[str]] = [[]]

        def seen() -> Any:
            last[0] = self.screen()
            return check(last[0])

        try:
            return wait_for(seen, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane:\n" + "\n".join(last[0])) from None

    def command(self) -> str:
        return self.tmux("display-message", "-p", "-t", "t", "#{pane_current_command}").strip()

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-S", self.socket, "kill-server"], capture_output=True, env=self.env
        )


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.close()


def table(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(name, [state, restarts, ...]) of each row on screen, top to bottom."""
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("NAME "))
    except StopIteration:
        return []
    rows = []
    for line in lines[start + 1 :]:
        words = line.split()
        if len(words) < 7 or words[-6] not in ("running", "starting", "stopping", "backoff"):
            continue
        rows.append((re.sub(r"^[├└│─ ]+", "", words[-7]), words[-6:]))
    return rows


def restarts(lines: list[str], name: str) -> str | None:
    return dict(table(lines)).get(name, [None, None])[1]


@needs_tmux
def test_top_live_under_tmux(three: DaemonProc, tmux: Tmux) -> None:
    tmux.type(ctl_top(three, "--interval", "0.3") + '; echo "top exited $?"')
    lines = tmux.wait(
        lambda s: (
            [n for n, _ in table(s)] == ["root", "alpha", "crew", "beta", "gamma", "bus"] and s
        ),
        "the tree on screen, by name",
    )
    assert len(lines) == 24 and max(len(line) for line in lines) <= 80
    assert lines[0].startswith("agentd top  ipc://") and "sort: name" in lines[1]
    assert lines[-1].strip() == "s/S: next/previous sort  r: reverse  q: quit"
    assert all(cells[0] == "running" for _, cells in table(lines))
    assert restarts(lines, "gamma") == "0"

    status = three.ctl_json("status", "gamma")
    os.kill(status["agents"][0]["pid"], signal.SIGKILL)
    lines = tmux.wait(lambda s: restarts(s, "gamma") == "1" and s, "gamma's restart on screen")
    assert restarts(lines, "crew") == "1" and restarts(lines, "beta") == "0"

    tmux.keys("s", "s")  # name -> state -> restarts
    lines = tmux.wait(lambda s: "sort: restarts" in s[1] and s, "the sort to change")
    assert [n for n, _ in table(lines)] == ["root", "crew", "gamma", "beta", "alpha", "bus"]
    assert max(len(line) for line in lines) <= 80

    tmux.keys("q")
    lines = tmux.wait(lambda s: exited(s, 0) and s, "top to quit")
    assert not table(lines) and tmux.command() == "bash"  # the shell's own screen again


def exited(lines: list[str], code: int) -> bool:
    """The shell echoed top's exit status (on its own line, or after a wrapped command)."""
    return any(line.rstrip().endswith(f"top exited {code}") for line in lines)


@needs_tmux
def test_top_says_the_daemon_went_away_and_exits_3(daemon_factory, tmux: Tmux, tmp_path) -> None:
    d = daemon_factory(CONFIG.format(rec=rec(tmp_path / "rec"))).start()
    tmux.type(ctl_top(d, "--interval", "0.3") + '; echo "top exited $?"')
    tmux.wait(lambda s: len(table(s)) == 6, "the tree on screen")
    assert d.stop() == 0
    lines = tmux.wait(lambda s: s[1].startswith("no agentd answering") and s, "the banner")
    assert re.fullmatch(
        r"no agentd answering \((no socket there|no reply)\): exit in \ds", lines[1].rstrip()
    )
    lines = tmux.wait(lambda s: exited(s, 3) and s, "top to give up", timeout=15)
    assert any("gave up" in line for line in lines) and tmux.command() == "bash"
