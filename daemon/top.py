"""`agentd ctl top`: the supervision tree, live, refreshed in place (SPEC §13).

Three layers, so the picture has fast tests of its own:

- `outline` (pure): the tree from `tree` and the figures from `status` as rows
  in tree order, each supervisor's children sorted by the sort key, and each
  supervisor's figures the sums of its subtree (so sorting by RSS puts the
  heaviest subtree first, and its heaviest agent first inside it).
- `render` (pure): those rows as a rich renderable that fits WIDTH x HEIGHT
  (names clipped, columns dropped from the right below 80 columns, rows past
  the screen counted on one line).
- `run_live` / `print_once` (I/O): `Feed` asks the control socket for `tree`
  and `status` every interval; keys (cbreak mode), resizes (SIGWINCH) and the
  answers all wake one zmq poller, so the refresh never waits on a key and a
  key never waits on the daemon. rich's `Live` redraws on the alternate screen,
  which is left, with the terminal's modes, on every way out.

`held` and `in_flight` are read from each status row when the daemon sends
them (the broker's counters) and shown as "-" when it does not.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .ctl import (
    ACK_TIMEOUT_MS,
    NO_DAEMON,
    REFUSED,
    STATE_COLOURS,
    TOP_SORT_KEYS,
    Ctl,
    check_socket,
    fail,
)

#: The figures of a row, summed over a supervisor's subtree.
FIGURES = ("restarts", "rss", "cpu", "in_flight", "held")
#: Sorting by state puts trouble first.
STATE_RANK = {
    s: i
    for i, s in enumerate(
        (
            "failed",
            "failing",
            "backoff",
            "stopping",
            "starting",
            "paused",
            "stopped",
            "idle",
            "running",
        )
    )
}
#: No answer for this long: the view says so and `top` exits 3.
GONE_AFTER_S = 5.0
#: How soon to try again when a request could not even be sent (no connection yet).
RETRY_S = 0.1
KEYS_HELP = "s/S: next/previous sort  r: reverse  q: quit"


# --- rows (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the view: an agent or a supervisor, with its place in the tree."""

    name: str
    supervisor: bool
    state: str
    restarts: int | None = None
    rss: int | None = None
    cpu: float | None = None
    in_flight: int | None = None
    held: int | None = None
    in_tree: bool = True  # False: outside the user's tree (the broker)
    #: For each level below the top, whether that ancestor (the last: this row) is its
    #: parent's last child: what the tree glyphs are drawn from.
    lasts: tuple[bool, ...] = ()
    children: tuple[Row, ...] = field(default=(), repr=False)


def _number(value: Any) -> Any:
    """A figure as the daemon sent it, or None (absent, null, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _sum(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _natural(name: str) -> tuple[Any, ...]:
    """worker@2 before worker@10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _worst(row: Row) -> int:
    """The rank of the worst state in the subtree: a supervisor with trouble below sorts up."""
    own = STATE_RANK.get(row.state, len(STATE_RANK))
    return min([own, *(_worst(child) for child in row.children)])


def sort_key(key: str) -> Callable[[Row], tuple[Any, ...]]:
    """name a-z, state trouble first (a subtree by its worst), figures high first (unknown
    last); ties by name."""
    if key == "name":
        return lambda r: (_natural(r.name),)
    if key == "state":
        return lambda r: (_worst(r), _natural(r.name))
    if key in FIGURES:

        def figure(r: Row) -> tuple[Any, ...]:
            value = getattr(r, key)
            return (value is None, -(value or 0), _natural(r.name))

        return figure
    raise ValueError(f"unknown sort key {key!r} (one of {', '.join(TOP_SORT_KEYS)})")


def _agent_row(name: str, state: str, status: dict[str, Any] | None, in_tree: bool = True) -> Row:
    status = status or {}
    figures = {key: _number(status.get(key)) for key in FIGURES}
    return Row(name, False, str(status.get("state") or state), in_tree=in_tree, **figures)


def _build(node: dict[str, Any], status: dict[str, dict[str, Any]]) -> Row:
    name = str(node.get("name", "?"))
    if node.get("type") != "supervisor":
        return _agent_row(name, str(node.get("state", "?")), status.get(name))
    children = tuple(_build(child, status) for child in node.get("children", []))
    sums = {key: _sum([getattr(c, key) for c in children]) for key in FIGURES}
    return Row(name, True, str(node.get("state", "?")), children=children, **sums)


def _flatten(
    row: Row, key: Callable[[Row], Any], reverse: bool, lasts: tuple[bool, ...]
) -> list[Row]:
    out = [replace(row, lasts=lasts, children=())]
    children = sorted(row.children, key=key, reverse=reverse)
    for i, child in enumerate(children):
        out += _flatten(child, key, reverse, (*lasts, i == len(children) - 1))
    return out


def outline(
    tree: dict[str, Any] | None, agents: list[dict[str, Any]], sort: str, reverse: bool = False
) -> list[Row]:
    """The rows in tree order, siblings sorted by `sort`; rows outside the tree (the
    broker, `bus`) last, at the top level, in the order `status` gave them."""
    status = {str(a.get("name")): a for a in agents}
    key = sort_key(sort)
    rows: list[Row] = []
    named: set[str] = set()
    if tree is not None:
        rows = _flatten(_build(tree, status), key, reverse, ())
        named = {r.name for r in rows}
    for name, a in status.items():
        if name not in named:
            rows.append(_agent_row(name, "?", a, in_tree=False))
    return rows


# --- the picture (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What the keys change: the sort key and its direction."""

    sort: str = "name"
    reverse: bool = False

    def on_key(self, key: str) -> View:
        """s/S: next/previous sort key, r: reverse; any other key changes nothing."""
        if key in ("s", "S"):
            step = 1 if key == "s" else -1
            index = (TOP_SORT_KEYS.index(self.sort) + step) % len(TOP_SORT_KEYS)
            return View(TOP_SORT_KEYS[index], False)
        if key == "r":
            return View(self.sort, not self.reverse)
        return self


@dataclass(frozen=True)
class Frame:
    """One picture's data: the daemon's answers and what to say about them."""

    tree: dict[str, Any] | None
    agents: list[dict[str, Any]]
    endpoint: str
    clock: str = ""
    problem: str | None = None  # the daemon not answering, in a banner
    keys: bool = False  # a live view: show the keys


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    cell: Callable[[Row], str]


def _size(value: int | None) -> str:
    """Bytes in at most 7 columns: 512K, 98.2M, 1.5G."""
    if value is None:
        return "-"
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value // 1024}K"


def _count(value: int | float | None, width: int) -> str:
    if value is None:
        return "-"
    text = str(int(value))
    for unit, scale in (("k", 10**3), ("M", 10**6), ("G", 10**9)):
        if len(text) <= width:
            break
        text = f"{int(value) // scale}{unit}"
    return text


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


#: After NAME, in the order they are dropped from the right when the screen is narrow.
COLUMNS = (
    Column("STATE", 8, lambda r: r.state),
    Column("RESTARTS", 8, lambda r: _count(r.restarts, 8)),
    Column("RSS", 7, lambda r: _size(r.rss)),
    Column("CPU%", 6, lambda r: _cpu(r.cpu)),
    Column("IN-FLIGHT", 9, lambda r: _count(r.in_flight, 9)),
    Column("HELD", 6, lambda r: _count(r.held, 6)),
)
GAP = 2  # columns between two cells
NAME_MIN = 16  # NAME gets what is left, at least this (else columns go)
#: Lines besides the rows: the title, the summary (or the banner), the table's header,
#: the keys.
CHROME = 4


def _glyphs(unicode: bool) -> tuple[str, str, str, str, str]:
    """(branch, last branch, pipe, space, ellipsis), each narrow: ctl tree's, in 3 columns."""
    if unicode:
        return "├─ ", "└─ ", "│  ", "   ", "…"
    return "|- ", "`- ", "|  ", "   ", "~"


def _clip(text: str, width: int, ellipsis: str) -> str:
    if len(text) <= width:
        return text
    return text[: max(0, width - len(ellipsis))] + ellipsis if width > 0 else ""


def _prefix(lasts: tuple[bool, ...], unicode: bool) -> str:
    branch, last_branch, pipe, space, _ = _glyphs(unicode)
    if not lasts:
        return ""
    head = "".join(space if last else pipe for last in lasts[:-1])
    return head + (last_branch if lasts[-1] else branch)


def fit_columns(width: int) -> tuple[int, tuple[Column, ...]]:
    """NAME's width and the columns that fit beside it in `width`."""
    columns = COLUMNS
    while True:
        used = sum(c.width + GAP for c in columns)
        if width - used >= NAME_MIN or len(columns) == 1:
            return max(1, width - used), columns
        columns = columns[:-1]


def _summary(rows: list[Row], view: View) -> str:
    agents = [r for r in rows if r.in_tree and not r.supervisor]
    counts: dict[str, int] = {}
    for r in agents:
        counts[r.state] = counts.get(r.state, 0) + 1
    states = ", ".join(
        f"{n} {s}" for s, n in sorted(counts.items(), key=lambda i: STATE_RANK.get(i[0], 99))
    )
    order = " (reversed)" if view.reverse else ""
    agents_word = "agent" if len(agents) == 1 else "agents"
    return f"{len(agents)} {agents_word}: {states or 'none'}   sort: {view.sort}{order}"


def _line(left: str, right: str, width: int, ellipsis: str) -> str:
    """`left` and `right` on one line of `width`, the left one clipped."""
    if not right:
        return _clip(left, width, ellipsis)
    room = width - len(right) - 1
    if room < 1:
        return _clip(right, width, ellipsis)
    return _clip(left, room, ellipsis).ljust(room) + " " + right


def render(
    frame: Frame, view: View, width: int, height: int | None = None, unicode: bool = True
) -> RenderableType:
    """The whole picture, no line wider than `width` and, given `height`, no taller.

    Pure: the same frame, view and size give the same picture, so tests render
    it to text without a terminal.
    """
    ellipsis = _glyphs(unicode)[4]
    rows = outline(frame.tree, frame.agents, view.sort, view.reverse)
    title = Text(_line(f"agentd top  {frame.endpoint}", frame.clock, width, ellipsis), "bold")
    if frame.problem:
        second = Text(_clip(frame.problem, width, ellipsis), "bold white on red")
    else:
        second = Text(_clip(_summary(rows, view), width, ellipsis))
    name_width, columns = fit_columns(width)
    shown, hidden = rows, 0
    if height is not None:
        room = max(1, height - CHROME)
        if len(rows) > room:
            shown, hidden = rows[: room - 1], len(rows) - (room - 1)
    table = Table(box=None, padding=(0, GAP // 2), pad_edge=False, show_edge=False)
    table.add_column("NAME", width=name_width, no_wrap=True, overflow="crop")
    for column in columns:
        justify = "left" if column.header == "STATE" else "right"
        table.add_column(column.header, width=column.width, no_wrap=True, justify=justify)
    for row in shown:
        prefix = _prefix(row.lasts, unicode)
        name = Text(prefix, "dim")
        name.append(
            _clip(row.name, name_width - len(prefix), ellipsis), "bold" if row.supervisor else ""
        )
        cells: list[Text] = [name]
        for column in columns:
            text = _clip(column.cell(row), column.width, ellipsis)
            style = ""
            if column.header == "STATE":
                style = STATE_COLOURS.get(row.state, "red" if row.state == "failing" else "")
            elif row.supervisor:
                style = "dim"  # a supervisor's figures are its subtree's sums
            cells.append(Text(text, style))
        table.add_row(*cells)
    parts: list[RenderableType] = [title, second, table]
    if hidden:
        parts.append(
            Text(_clip(f"... {hidden} more (a taller window shows them)", width, ellipsis), "dim")
        )
    if frame.keys:
        if height is not None:  # the keys on the last line, as in top(1)
            blank = height - (3 + len(shown) + (1 if hidden else 0) + 1)
            if blank > 0:
                parts.append(Text("\n" * (blank - 1)))  # n newlines: n + 1 lines
        parts.append(Text(_clip(KEYS_HELP, width, ellipsis).ljust(width), "reverse"))
    return Group(*parts)


# --- the daemon's answers (I/O) -------------------------------------------------------


class Feed:
    """`tree` and `status` over one DEALER to the control socket.

    The daemon answers each request in a task of its own, so the two replies
    come in either order: they are told apart by their shape. ZMQ_IMMEDIATE
    makes a send with no connection fail at once (zmq.Again) instead of
    queueing requests for a daemon that is not there; zmq reconnects by itself
    when one comes back on the same endpoint.
    """

    def __init__(self, c: Ctl) -> None:
        import zmq

        self.endpoint = c.endpoint("control")
        self.ctx = zmq.Context()
        self.sock = c.dealer(self.ctx)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.connect(self.endpoint.url)
        self.tree: dict[str, Any] | None = None
        self.agents: list[dict[str, Any]] | None = None
        self.answered = time.monotonic()  # the last reply (or the start)
        self.problem: str | None = None  # why the last ask could not be sent
        self.refused: str | None = None  # the daemon's error, if it refused the last one

    def ask(self) -> bool:
        """Send both requests; False (and `problem` says why) if there is no daemon."""
        import zmq

        from .protocol import Request, encoder

        if self.endpoint.path is not None and not os.path.exists(self.endpoint.path):
            self.problem = "no socket there"
            return False
        try:
            for cmd in ("tree", "status"):
                self.sock.send(encoder.encode(Request(cmd, {})), zmq.NOBLOCK)
        except zmq.Again:
            self.problem = "not connected"
            return False
        self.problem = None
        return True

    def receive(self) -> None:
        """Take every frame waiting: a Reply's data replaces what it answers."""
        from .protocol import Reply, decoder

        while self.sock.poll(0):
            frame = decoder.decode(self.sock.recv())
            if not isinstance(frame, Reply):
                continue  # the Ack of a request
            self.answered = time.monotonic()
            self.refused = None if frame.ok else (frame.error or "refused")
            if not frame.ok:
                continue
            if isinstance(frame.data, dict) and "agents" in frame.data:
                self.agents = list(frame.data["agents"])
            elif isinstance(frame.data, dict):
                self.tree = frame.data

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# --- the terminal (I/O) -----------------------------------------------------------------


@contextlib.contextmanager
def cbreak(stream: Any) -> Iterator[int | None]:
    """Keys one at a time, unechoed, Ctrl-C still a SIGINT; the modes restored after.

    Yields the fd to read keys from, or None when `stream` is not a terminal.
    """
    import termios
    import tty

    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def resizes() -> Iterator[int]:
    """A pipe that gets a byte on every SIGWINCH (the wakeup fd), for the poller."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    old_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    old = signal.signal(signal.SIGWINCH, lambda signum, frame: None)
    try:
        yield read
    finally:
        signal.signal(signal.SIGWINCH, old)
        signal.set_wakeup_fd(old_fd)
        os.close(read)
        os.close(write)


def _terminal_size(console: Console) -> tuple[int, int]:
    """The terminal's size now (rich would let $COLUMNS win, which never changes)."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return console.size.width, console.size.height
    return size.columns or 80, size.lines or 24


def _unicode(console: Console) -> bool:
    return console.encoding.lower().replace("-", "").startswith("utf")


def print_once(c: Ctl, sort: str) -> int:
    """One frame on a stdout that is not a terminal (scripts, tests): exit 0, or 3."""
    endpoint = c.endpoint("control")
    check_socket(endpoint)
    feed = Feed(c)
    try:
        deadline = time.monotonic() + ACK_TIMEOUT_MS / 1000
        sent = False
        while feed.tree is None or feed.agents is None:
            if time.monotonic() > deadline:
                fail(f"no agentd answering at {endpoint.url}", NO_DAEMON)
            sent = sent or feed.ask()
            feed.sock.poll(50)
            feed.receive()
            if feed.refused:
                fail(feed.refused, REFUSED)
    finally:
        feed.close()
    console = Console()
    frame = Frame(feed.tree, feed.agents, endpoint.url, time.strftime("%H:%M:%S"))
    console.print(render(frame, View(sort), console.width, None, _unicode(console)))
    return 0


_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|O.|.)?")


def press(keys: str, view: View) -> View | None:
    """The view after these keys, typed in one go; None once q is among them (quit).

    Escape sequences (arrows, function keys: ESC [ A, ESC O S) are not letters typed.
    """
    for key in _ESCAPES.sub("", keys):
        if key == "q":
            return None
        view = view.on_key(key)
    return view


def _banner(feed: Feed, now: float, patience: float) -> str | None:
    """What the summary line gives way to: no daemon (and when top gives up), or a refusal."""
    why = feed.problem
    if why is None and now - feed.answered > patience:
        why = "no reply"
    if why is None:
        return feed.refused
    left = max(0.0, GONE_AFTER_S - (now - feed.answered))
    return f"no agentd answering ({why}): exit in {left:.0f}s"


def run_live(c: Ctl, sort: str, interval: float) -> int:
    """Refresh every `interval` until q or Ctrl-C (0), or GONE_AFTER_S without a reply (3)."""
    import zmq

    endpoint = c.endpoint("control")
    check_socket(endpoint)
    feed = Feed(c)
    view: View | None = View(sort)
    console = Console()
    unicode = _unicode(console)
    patience = max(ACK_TIMEOUT_MS / 1000, 2 * interval)  # slower than that: say so
    poller = zmq.Poller()
    poller.register(feed.sock, zmq.POLLIN)
    try:
        with (
            cbreak(sys.stdin) as keys,
            resizes() as resized,
            Live(console=console, screen=True, auto_refresh=False, redirect_stderr=False) as live,
        ):
            if keys is not None:
                poller.register(keys, zmq.POLLIN)
            poller.register(resized, zmq.POLLIN)
            next_ask = 0.0
            while view is not None:
                now = time.monotonic()
                if now >= next_ask:
                    next_ask = now + (interval if feed.ask() else RETRY_S)
                if now - feed.answered > GONE_AFTER_S:
                    break
                width, height = _terminal_size(console)
                console.size = (width, height)
                clock = time.strftime("%H:%M:%S")
                problem = _banner(feed, now, patience)
                frame = Frame(feed.tree, feed.agents or [], endpoint.url, clock, problem, keys=True)
                live.update(render(frame, view, width, height, unicode), refresh=True)
                wake = min(next_ask, feed.answered + GONE_AFTER_S)
                for ready, _ in poller.poll(max(0.0, wake - time.monotonic()) * 1000 + 1):
                    if ready is feed.sock:
                        feed.receive()
                    elif ready == resized:
                        with contextlib.suppress(BlockingIOError):
                            os.read(resized, 512)  # the redraw below reads the new size
                    elif ready == keys and view is not None:
                        typed = os.read(keys, 64)
                        if not typed:  # the terminal hung up: no more keys, Ctrl-C still works
                            poller.unregister(keys)
                        view = press(typed.decode(errors="replace"), view)
            if view is None:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        feed.close()
    fail(f"no agentd answering at {endpoint.url} for {GONE_AFTER_S:g}s: gave up", NO_DAEMON)
    return NO_DAEMON


def run(c: Ctl, sort: str, interval: float) -> int:
    """`ctl top`: live on a terminal, one frame otherwise."""
    if not sys.stdout.isatty():
        return print_once(c, sort)
    return run_live(c, sort, interval)
