"""`agentd ctl`: drive a running daemon over its control socket.

Kept import-light on purpose — click, zmq, msgspec and this package's small
protocol module — because people run `ctl status` in loops and scripts.
Exit status: 0 done, 1 refused, 2 usage, 3 no daemon answering.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from agentd.bus.endpoint import Endpoint

NO_DAEMON = 3
REFUSED = 1
ACK_TIMEOUT_MS = 1500

STATE_COLOURS = {
    "running": "green",
    "starting": "yellow",
    "stopping": "yellow",
    "backoff": "yellow",
    "stopped": "blue",
    "failed": "red",
    "paused": "cyan",
}


def check_socket(endpoint: Endpoint) -> None:
    """An ipc control socket that is not there, or not ours to use: exit 3 at once."""
    if endpoint.path is not None:
        if not os.path.exists(endpoint.path):
            fail(f"no agentd answering at {endpoint.url} (no socket there)", NO_DAEMON)
        if not os.access(endpoint.path, os.W_OK):
            fail(f"permission denied on {endpoint.path} (root or group agentd)", NO_DAEMON)


class Ctl:
    """What every ctl command needs: the config path and the endpoints it names."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: dict[str, str] | None = None

    def settings(self) -> dict[str, str]:
        """control/bus endpoints from the config, without validating the rest."""
        if self._settings is None:
            from .locate import ConfigError, find_config, locate_daemon

            try:
                path = find_config(self.config_path)
                data = tomllib.loads(path.read_text())
            except ConfigError as exc:
                fail(str(exc), NO_DAEMON)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                fail(f"cannot read config: {exc}", NO_DAEMON)
            daemon = data.get("daemon", {}) if isinstance(data.get("daemon"), dict) else {}
            where = locate_daemon(path, daemon)  # as the daemon does (config.py)
            self._settings = {
                "control": where.control,
                "bus": where.bus,
                "keys_dir": where.keys_dir or "",
            }
        return self._settings

    def endpoint(self, key: str) -> Endpoint:
        """The control or bus endpoint, parsed; a bad one exits 3 (no daemon serves it)."""
        from agentd.bus.endpoint import parse_endpoint

        try:
            return parse_endpoint(self.settings()[key])
        except ValueError as exc:
            fail(f"daemon.{key}: {exc}", NO_DAEMON)

    def dealer(self, ctx: Any) -> Any:
        """A DEALER for the control socket, not yet connected (options go first).

        LINGER 0, and the client's CurveZMQ keys when the endpoint is tcp.
        """
        import zmq

        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.endpoint("control").needs_keys:
            from pathlib import Path

            from agentd.bus.keys import client_curve

            client_curve(sock, Path(self.settings()["keys_dir"]))
        return sock

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        on_item: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send one request; stream Items to `on_item`; return the Reply's data."""
        import zmq

        from .protocol import Ack, Item, Reply, Request, decoder, encoder

        endpoint = self.endpoint("control")
        check_socket(endpoint)
        ctx = zmq.Context()
        sock = self.dealer(ctx)
        try:
            sock.connect(endpoint.url)
            sock.send(encoder.encode(Request(cmd, args or {})))
            if not sock.poll(ACK_TIMEOUT_MS):
                fail(f"no agentd answering at {endpoint.url}", NO_DAEMON)
            while True:
                frame = decoder.decode(sock.recv())
                if isinstance(frame, Ack):
                    continue
                if isinstance(frame, Item):
                    if on_item is not None:
                        on_item(frame.data)
                    continue
                if isinstance(frame, Reply):
                    if not frame.ok:
                        fail(frame.error or "refused", frame.code or REFUSED)
                    return frame.data
        except KeyboardInterrupt:
            sys.exit(0)
        finally:
            sock.close(0)
            ctx.term()


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"agentd ctl: {message}", err=True)
    sys.exit(code)


pass_ctl = click.make_pass_decorator(Ctl)


@click.group()
@click.option("--config", "config_path", metavar="PATH", help="Config file (as for `run`).")
@click.pass_context
def ctl(ctx: click.Context, config_path: str | None) -> None:
    """Talk to a running daemon (exit 0 done, 1 refused, 2 usage, 3 no daemon)."""
    ctx.obj = Ctl(config_path)


# --- formatting -------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / (1024 * 1024):.1f}M"


def _last_exit(last: dict[str, Any] | None) -> str:
    if not last:
        return "-"
    what = last.get("signal") or f"code {last.get('code')}"
    return f"{last['reason']} ({what})"


def _table(rows: list[list[str]], colour_col: int | None = None) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    tty = sys.stdout.isatty()
    lines = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            padded = cell.ljust(widths[i]) if i < len(row) - 1 else cell
            if tty and n > 0 and i == colour_col and cell in STATE_COLOURS:
                padded = click.style(padded, fg=STATE_COLOURS[cell])
            cells.append(padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- commands ------------------------------------------------------------------------------


@ctl.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable).")
@pass_ctl
def status(c: Ctl, names: tuple[str, ...], as_json: bool) -> None:
    """Agents: state, pid, uptime, restarts, last exit, RSS, CPU%."""
    data = c.call("status", {"names": list(names)})
    if as_json:
        click.echo(json.dumps(data))
        return
    rows = [["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "RSS", "CPU%"]]
    for a in data["agents"]:
        rows.append(
            [
                a["name"],
                a["state"],
                str(a["pid"] or "-"),
                _duration(a["uptime"]),
                str(a["restarts"]),
                _last_exit(a["last_exit"]),
                _bytes(a["rss"]),
                "-" if a["cpu"] is None else f"{a['cpu']:.1f}",
            ]
        )
    click.echo(_table(rows, colour_col=1))


@ctl.command()
@pass_ctl
def tree(c: Ctl) -> None:
    """Draw the supervision tree with strategies and states."""
    data = c.call("tree")
    tty = sys.stdout.isatty()

    def state(text: str) -> str:
        return click.style(text, fg=STATE_COLOURS.get(text)) if tty else text

    def draw(node: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        if node["type"] == "supervisor":
            strategy = node["strategy"]
            if node.get("template"):  # dynamic: what it spawns, and how many at most
                strategy += f" of {node['template']}, max {node['max_children']}"
            label = (
                f"{node['name']} [{strategy}, {node['max_restarts']} in "
                f"{node['max_seconds']:g}s] {state(node['state'])}"
            )
        else:
            pid = f" pid {node['pid']}" if node.get("pid") else ""
            label = f"{node['name']} ({node['restart']}) {state(node['state'])}{pid}"
        click.echo(f"{prefix}{branch}{label}")
        children = node.get("children", [])
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for i, child in enumerate(children):
            draw(child, inner, i == len(children) - 1, False)

    draw(data, "", True, True)


@ctl.command()
@click.option(
    "--textfile",
    is_flag=True,
    help="For node_exporter's textfile collector: without the daemon's process_* metrics "
    "(node_exporter has its own).",
)
@pass_ctl
def metrics(c: Ctl, textfile: bool) -> None:
    """Print the Prometheus metrics (text exposition)."""
    click.echo(c.call("metrics", {"textfile": textfile}), nl=False)


def _simple(cmd: str, verb: str) -> Callable[..., None]:
    @click.argument("names", nargs=-1, required=True)
    @pass_ctl
    def command(c: Ctl, names: tuple[str, ...]) -> None:
        data = c.call(cmd, {"names": list(names)})
        for name in data[verb]:
            click.echo(f"{name}: {verb}")

    command.__doc__ = f"{cmd.capitalize()} agents (a pool's name means all its members)."
    return command


ctl.command("start")(_simple("start", "started"))
ctl.command("stop")(_simple("stop", "stopped"))
ctl.command("restart")(_simple("restart", "restarted"))
ctl.command("pause")(_simple("pause", "paused"))
ctl.command("resume")(_simple("resume", "resumed"))


@ctl.command()
@pass_ctl
def reload(c: Ctl) -> None:
    """Re-read the config and apply the difference."""
    data = c.call("reload")
    for key in ("added", "removed", "changed"):
        names = data.get(key) or []
        click.echo(f"{key}: {', '.join(names) if names else '-'}")
    if data.get("warning"):
        click.echo(f"warning: {data['warning']}", err=True)


@ctl.command()
@click.argument("supervisor")
@click.argument("name")
@click.option("--args", "args_json", metavar="JSON", help="The child's args (self.args).")
@pass_ctl
def spawn(c: Ctl, supervisor: str, name: str, args_json: str | None) -> None:
    """Start NAME, a child of the dynamic SUPERVISOR; returns once it runs."""
    args = None
    if args_json is not None:
        try:
            args = json.loads(args_json)
        except json.JSONDecodeError as exc:
            fail(f"--args is not JSON: {exc}", REFUSED)
    data = c.call("spawn", {"supervisor": supervisor, "name": name, "args": args})
    click.echo(f"spawned {name} under {supervisor} (pid {data.get('pid')})")


@ctl.command()
@click.argument("name")
@pass_ctl
def terminate(c: Ctl, name: str) -> None:
    """Stop the dynamic child NAME for good (it is not spawned again)."""
    c.call("terminate", {"name": name})
    click.echo(f"terminated {name}")


@ctl.command()
@click.argument("name")
@click.argument("count", type=click.IntRange(min=0))
@pass_ctl
def scale(c: Ctl, name: str, count: int) -> None:
    """Grow or shrink the pool NAME to COUNT members."""
    data = c.call("scale", {"name": name, "count": count})
    added, removed = data.get("added") or [], data.get("removed") or []
    click.echo(
        f"{name}: {data['replicas']} replicas"
        f" (added: {', '.join(added) or '-'}; removed: {', '.join(removed) or '-'})"
    )


@ctl.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output (Ctrl-C stops).")
@click.option("-n", "lines", type=click.IntRange(min=0), default=10, show_default=True)
@pass_ctl
def logs(c: Ctl, name: str, follow: bool, lines: int) -> None:
    """Print the last lines of NAME's log."""
    args = {"name": name, "lines": lines, "follow": follow}
    c.call("logs", args, lambda chunk: click.echo(chunk, nl=False))


#: How often a following `ctl events -f` and the daemon check each other over tcp
#: (ZMTP heartbeats); over ipc a daemon that goes away is noticed at once.
STREAM_HEARTBEAT_MS = 2000


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """`--since SEQ` or `--since RUN:SEQ` as {"since": SEQ, "run": RUN or None}."""
    if value is None:
        return {}
    run, _, seq = value.rpartition(":")
    if not (seq.isascii() and seq.isdigit()):
        raise click.BadParameter("give [RUN:]SEQ, SEQ a whole number >= 0", ctx, param)
    return {"since": int(seq), "run": run or None}


def _follow_events(c: Ctl, args: dict[str, Any]) -> None:
    """`events -f`: print events until Ctrl-C; exit 3 if the daemon goes away.

    `Ctl.call` would wait forever on a daemon that died (zmq reconnects
    silently, and the new daemon knows nothing of the request), so this watches
    the connection: on a disconnect it prints what already arrived, then says
    where to resume (`--since RUN:SEQ` of the last event printed) and exits 3.
    It does not reconnect by itself: after a restart the run is another, and
    only the caller can decide what a gap means to it.
    """
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from .protocol import Item, Reply, Request, decoder, encoder

    endpoint = c.endpoint("control")
    check_socket(endpoint)
    # Where a new `events --since` would take up: after the last event printed.
    resume = [f"{args['run']}:{args['since']}" if args.get("run") else str(args.get("since", ""))]

    def show(frame: Any) -> Any:
        """Print an Item (and remember where it was), or return the Reply."""
        if isinstance(frame, Item):
            resume[0] = f"{frame.data['run']}:{frame.data['seq']}"
            click.echo(json.dumps(frame.data))
        elif isinstance(frame, Reply):
            if not frame.ok:
                fail(frame.error or "refused", frame.code or REFUSED)
            return frame
        return None

    ctx = zmq.Context()
    sock = c.dealer(ctx)
    sock.setsockopt(zmq.HEARTBEAT_IVL, STREAM_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * STREAM_HEARTBEAT_MS)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # before connect: none missed
    try:
        sock.connect(endpoint.url)
        sock.send(encoder.encode(Request("events", args)))
        if not sock.poll(ACK_TIMEOUT_MS):
            fail(f"no agentd answering at {endpoint.url}", NO_DAEMON)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if sock in ready:
                if show(decoder.decode(sock.recv())) is not None:
                    return
                continue
            recv_monitor_message(monitor)
            while sock.poll(0):  # what the daemon sent before it went
                if show(decoder.decode(sock.recv())) is not None:
                    return
            hint = f"; resume with --since {resume[0]}" if resume[0] else ""
            fail(f"event stream lost: the daemon at {endpoint.url} went away{hint}", NO_DAEMON)
    except KeyboardInterrupt:
        sys.exit(0)
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()


@ctl.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops).")
@click.option(
    "--since",
    metavar="[RUN:]SEQ",
    callback=_since,
    help="Every held event after SEQ (of run RUN) instead of the last 100.",
)
@pass_ctl
def events(c: Ctl, follow: bool, since: dict[str, Any]) -> None:
    """Events as JSON lines: the last 100, or all after --since; -f keeps following.

    Each line has `seq` (1, 2, 3... per daemon run) and `run` (this run's
    token). `--since RUN:SEQ` resumes after the line with that run and seq, with
    no gap and no repeat, as long as the daemon still holds SEQ + 1 (it keeps
    the last `daemon.event_history` events, 10,000 by default) and has not
    restarted; otherwise it exits 1 saying which. A bare SEQ means the current
    run, unchecked. A SEQ past the newest prints nothing (and with -f waits for
    it). With -f, a daemon that goes away ends the stream with exit 3 and the
    `--since` to resume with.
    """
    args = {"follow": follow, **since}
    if follow:
        _follow_events(c, args)
    else:
        c.call("events", args, lambda e: click.echo(json.dumps(e)))


#: `ctl top --sort` and the keys that cycle through them (daemon/top.py sorts by them).
TOP_SORT_KEYS = ("name", "state", "restarts", "rss", "cpu", "in_flight", "held")


@ctl.command()
@click.option(
    "--sort",
    type=click.Choice(TOP_SORT_KEYS),
    default="name",
    show_default=True,
    help="Sort each supervisor's children by this (figures: highest first).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@pass_ctl
def top(c: Ctl, sort: str, interval: float) -> None:
    """A live view of the tree: state, restarts, RSS, CPU%, in-flight, held.

    \b
    Keys: s next sort key, S previous, r reverse the order, q (or Ctrl-C) quit.
    A supervisor's row sums its subtree, so sorting by rss or cpu puts the
    heaviest subtree first. It fits 80 columns (names clipped; narrower
    terminals lose columns from the right) and redraws on a resize. When no
    daemon answers for 5 s it exits 3; a daemon back before that is picked up
    again. With stdout not a terminal it prints one frame and exits 0.
    """
    from .top import run

    sys.exit(run(c, sort, interval))


@ctl.command()
@pass_ctl
def shutdown(c: Ctl) -> None:
    """Stop the whole tree and the daemon; returns once stopped."""
    c.call("shutdown")
    click.echo("agentd: stopped")


# --- the bus ----------------------------------------------------------------------------

BUS_PROBE_S = 1.2


def _json_arg(text: str | None) -> Any:
    """The optional JSON argument of send/publish/request (usage error if it is not JSON)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="JSON") from None


def _bus_call(c: Ctl, use: Callable[[Any], Any]) -> Any:
    """Run `use(client)` on a bus Client named ctl-<pid>, with ctl's exit statuses.

    The broker is probed first, so "no daemon" (3) is told apart from a refusal
    or a timeout of the call itself (1).
    """
    from agentd.bus.client import BusError, BusTimeout, Client

    endpoint = c.endpoint("bus")
    if endpoint.path is not None and not os.path.exists(endpoint.path):
        fail(f"no agentd bus at {endpoint.url} (no socket there)", NO_DAEMON)
    keys_dir = c.settings()["keys_dir"] or None
    try:
        client = Client(
            endpoint.url, name=f"ctl-{os.getpid()}", keys_dir=keys_dir, receipt_timeout=BUS_PROBE_S
        )
    except BusError as exc:
        fail(str(exc), NO_DAEMON)
    try:
        try:
            client.stats()
        except BusTimeout:
            client.close(linger=0)  # the HELLO nobody took must not hold us up
            fail(f"no agentd bus answering at {endpoint.url}", NO_DAEMON)
        client.receipt_timeout = 5.0
        return use(client)
    except BusError as exc:
        fail(str(exc), REFUSED)
    except KeyboardInterrupt:
        sys.exit(0)
    finally:
        client.close()


@ctl.command()
@click.argument("name")
@click.argument("type_", metavar="TYPE")
@click.argument("data", metavar="[JSON]", required=False)
@pass_ctl
def send(c: Ctl, name: str, type_: str, data: str | None) -> None:
    """Send a signal to NAME (an agent or a pool); held if NAME is restarting."""
    from agentd.bus.tracecontext import new_trace

    payload = _json_arg(data)
    tp = new_trace()  # printed, for `ctl trace`
    _bus_call(c, lambda client: client.send(name, type_, payload, traceparent=tp))
    click.echo(f"sent {type_} to {name} (trace {tp[3:35]})")


@ctl.command()
@click.argument("type_", metavar="TYPE")
@click.argument("data", metavar="[JSON]", required=False)
@pass_ctl
def publish(c: Ctl, type_: str, data: str | None) -> None:
    """Publish a signal to every agent subscribed to a matching pattern."""
    from agentd.bus.tracecontext import new_trace

    payload = _json_arg(data)
    tp = new_trace()  # printed, for `ctl trace`
    count = _bus_call(c, lambda client: client.publish(type_, payload, traceparent=tp))
    plural = "" if count == 1 else "s"
    click.echo(f"published {type_} to {count} subscriber{plural} (trace {tp[3:35]})")


@ctl.command()
@click.argument("name")
@click.argument("type_", metavar="TYPE")
@click.argument("data", metavar="[JSON]", required=False)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the reply.",
)
@pass_ctl
def request(c: Ctl, name: str, type_: str, data: str | None, timeout: float) -> None:
    """Send a request to NAME and print its reply as JSON."""
    payload = _json_arg(data)
    reply = _bus_call(c, lambda client: client.request(name, type_, payload, timeout=timeout))
    click.echo(json.dumps(reply))


@ctl.command()
@click.argument("id_", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The records and the tree as JSON.")
@pass_ctl
def trace(c: Ctl, id_: str, as_json: bool) -> None:
    """The causal tree of the trace a signal ID belongs to (ID: a signal or trace id).

    Every signal of that trace the broker knows, replies included, each under
    the one being handled when it was sent: type, source → recipient, time,
    outcome; ID's line is marked ▶. A trace id is the middle of a
    `traceparent` (32 hex digits), as `ctl send` and the hub's ingress show.
    The broker remembers the last 10,000 signals, and for `ack = true` agents
    what its journal holds.
    """
    from agentd.bus.tracetree import as_json as tree_json
    from agentd.bus.tracetree import render

    records = _bus_call(c, lambda client: client.trace(id_))
    mark = id_ if any(r.id == id_ for r in records) else None
    if as_json:
        click.echo(json.dumps(tree_json(records, mark)))
    else:
        click.echo("\n".join(render(records, mark)))


# --- the dead-letter queue ------------------------------------------------------------


class _DlqGroup(click.Group):
    """`dlq [AGENT]` lists, `dlq redrive|purge [AGENT]` act: one optional name, two verbs.

    A click group would take the first word for its own optional argument, so
    AGENT is not one: before parsing, a first word that is not a subcommand
    becomes the hidden `--agent` option. Subcommand names win; `--` marks the
    next word as an agent name whatever it is (`ctl dlq -- redrive`).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        for i, word in enumerate(args):
            if word == "--":
                if i + 1 < len(args):
                    args[i : i + 2] = ["--agent", args[i + 1]]
                break
            if word.startswith("-"):
                continue
            if word not in self.commands:
                args[i : i + 1] = ["--agent", word]
            break
        return super().parse_args(ctx, args)


def _letter_json(letter: Any) -> dict[str, Any]:
    """One dead letter as `ctl dlq --json` prints it (these keys, no others)."""
    return {
        "id": letter.id,
        "agent": letter.agent,
        "type": letter.type,
        "source": letter.source,
        "deliveries": letter.deliveries,
        "error": letter.error,
        "time": letter.time,
    }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


TABLE_WIDTH = 80


def _letters_table(letters: list[Any]) -> str:
    """ID, AGENT, TYPE, DELIVERIES, AGE, then `from SOURCE: ERROR` indented below each row.

    The id is never clipped (it is what `--id` takes); AGENT and TYPE are, so a
    row fits in 80 columns, and so is the detail line.
    """
    import time

    now = time.time()
    fixed = 28 + len("DELIVERIES") + len("AGE") + 5 + 4 * 2  # id, deliveries, age, gaps
    agent_w = max([len("AGENT")] + [len(x.agent) for x in letters])
    type_w = max([len("TYPE")] + [len(x.type) for x in letters])
    room = TABLE_WIDTH - fixed
    if agent_w + type_w > room:
        agent_w = min(agent_w, max(len("AGENT"), room // 3))
        type_w = room - agent_w
    rows = [["ID", "AGENT", "TYPE", "DELIVERIES", "AGE"]]
    for x in letters:
        age = _duration(max(0.0, now - x.time))
        rows.append([x.id, _clip(x.agent, agent_w), _clip(x.type, type_w), str(x.deliveries), age])
    lines = _table(rows).split("\n")
    out = [lines[0]]
    for line, x in zip(lines[1:], letters, strict=True):
        error = " ".join((x.error or "-").split())  # a traceback's lines, on one line
        out += [line, _clip(f"    from {x.source}: {error}", TABLE_WIDTH)]
    return "\n".join(out)


def _print_letters(letters: list[Any], as_json: bool, verb: str | None) -> None:
    """The list (verb None) or what redrive/purge moved: JSON, a table or a count line."""
    if as_json:
        click.echo(json.dumps({"dead_letters": [_letter_json(x) for x in letters]}))
    elif verb is not None:
        click.echo(f"{verb} {len(letters)} dead letter{'' if len(letters) == 1 else 's'}")
    elif not letters:
        click.echo("no dead letters")
    else:
        click.echo(_letters_table(letters))


def _json_flag(ctx: click.Context, own: bool) -> bool:
    """--json given after the subcommand, or before it (`ctl dlq --json purge`)."""
    return own or bool(ctx.parent is not None and ctx.parent.params.get("as_json"))


@ctl.group(
    cls=_DlqGroup,
    invoke_without_command=True,
    subcommand_metavar="[AGENT] | redrive|purge [AGENT] [--id ID]",
)
@click.option("--agent", hidden=True, help="The agent or pool (given as the first word).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable).")
@click.pass_context
def dlq(ctx: click.Context, agent: str | None, as_json: bool) -> None:
    """Dead letters: signals an ack = true agent failed max_deliveries times.

    `ctl dlq [AGENT]` lists them (of one agent or pool, or all), `ctl dlq
    redrive` delivers them again with the count reset, `ctl dlq purge` drops
    them. `redrive` and `purge` are read as the verbs; to list an agent with
    one of those names, write `ctl dlq -- redrive`.
    """
    if ctx.invoked_subcommand is not None:
        if agent is not None:
            raise click.UsageError(f"AGENT goes after {ctx.invoked_subcommand!r}")
        return
    c = ctx.find_object(Ctl)
    letters = _bus_call(c, lambda client: client.dead_letters(agent))
    _print_letters(letters, as_json, None)


def _dlq_move(op: str, verb: str) -> Callable[..., None]:
    """`dlq redrive` / `dlq purge`: the same arguments, the same output, another Client call."""

    @click.argument("agent", required=False)
    @click.option("--id", "id_", metavar="ID", help="Only this dead letter.")
    @click.option("--json", "as_json", is_flag=True, help="Print what moved as JSON.")
    @click.pass_context
    def command(ctx: click.Context, agent: str | None, id_: str | None, as_json: bool) -> None:
        c = ctx.find_object(Ctl)
        letters = _bus_call(c, lambda client: getattr(client, op)(agent, id_))
        if id_ is not None and not letters:
            where = f" of {agent}" if agent else ""
            fail(f"no dead letter{where} with id {id_}", REFUSED)
        _print_letters(letters, _json_flag(ctx, as_json), verb)

    command.__doc__ = {
        "redrive": "Deliver dead letters (of AGENT, or all) again, their count reset.",
        "purge": "Drop dead letters (of AGENT, or all) for good.",
    }[op]
    return command


dlq.command("redrive")(_dlq_move("redrive", "redrove"))
dlq.command("purge")(_dlq_move("purge", "purged"))
