"""Prometheus metrics (SPEC §13): one collector over a daemon snapshot, served two ways.

`agentd ctl metrics` asks for the exposition over the control socket;
`daemon.metrics = "HOST:PORT"` also serves it over HTTP(S) with
prometheus_client's own server. Both go through the same registry: this
module's collector plus prometheus_client's `ProcessCollector` (the daemon's
`process_*`). prometheus_client writes the text; nothing here formats it.

The daemon's state lives on its event loop, and prometheus_client collects on
whatever thread asks (its HTTP server runs one per request). So `collect()`
never reads the daemon directly: it asks the loop for a `Snapshot` (one
`/proc` pass, one question to the broker; `Daemon.metrics_snapshot`) and
builds the families from that plain data, off the loop. `ctl metrics` runs
the same `generate_latest` in a worker thread, so there is one path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, make_wsgi_app
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: The broker's counters (`Stats.counters`) that count signals, exported as
#: `agentd_bus_signals_total{kind=...}` under the same names.
SIGNAL_KINDS = (
    "routed",  # signals the broker took to route
    "delivered",  # handed to a recipient (a publication counts once per subscriber)
    "held",  # put in a hold queue for an agent that was not connected (at most once)
    "kept",  # accepted for an ack = true agent: in its mailbox and the journal
    "acked",  # finished by an ack = true agent
    "nacked",  # failed by an ack = true agent's handler (retried later)
    "dead_lettered",  # moved to the dead-letter queue after max_deliveries
    "errors",  # refused, the sender told why (unknown recipient, ...)
    "dropped",  # not taken: a full queue, a journal that cannot be written
)
SNAPSHOT_TIMEOUT = 10.0  # seconds a scrape waits for the daemon's loop to answer


class AgentSample(msgspec.Struct, frozen=True):
    """One agent (or the broker, `bus`) as the metrics show it."""

    name: str
    up: bool  # running: started, and not stopping
    restarts: dict[str, int]  # by the reason of the exit each restart followed
    rss: int | None = None  # bytes, the agent and what it forked; None: no process
    cpu_seconds: float | None = None  # user + system of the agent's process
    start_time: float | None = None  # unix seconds the current process started


class Snapshot(msgspec.Struct, frozen=True):
    """Everything one scrape reports, taken on the daemon's loop in one go."""

    agents: list[AgentSample]
    bus: dict[str, int] | None  # the broker's counters; None: it is down or did not answer


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot (pure: the unit tests feed it fixed data).

    Bus families are absent when the broker did not answer: an absent series,
    not a stale one (`agentd_agent_up{agent="bus"}` says whether it runs).
    """
    up = GaugeMetricFamily("agentd_agent_up", "1 if the agent is running, else 0", labels=["agent"])
    restarts = CounterMetricFamily(
        "agentd_agent_restarts",
        "Restarts of the agent, by the reason of the exit before each",
        labels=["agent", "reason"],
    )
    rss = GaugeMetricFamily(
        "agentd_agent_resident_memory_bytes",
        "Resident memory of the agent and every process it forked",
        labels=["agent"],
    )
    cpu = CounterMetricFamily(
        "agentd_agent_cpu_seconds",
        "User and system CPU time of the agent's current process",
        labels=["agent"],
    )
    started = GaugeMetricFamily(
        "agentd_agent_start_time_seconds",
        "Start time of the agent's current process, in unix seconds",
        labels=["agent"],
    )
    for a in snap.agents:
        label = [a.name]
        up.add_metric(label, 1.0 if a.up else 0.0)
        for reason, count in sorted(a.restarts.items()):
            restarts.add_metric([a.name, reason], count)
        if a.rss is not None:
            rss.add_metric(label, a.rss)
        if a.cpu_seconds is not None:
            cpu.add_metric(label, a.cpu_seconds)
        if a.start_time is not None:
            started.add_metric(label, a.start_time)
    yield from (up, restarts, rss, cpu, started)
    if snap.bus is None:
        return
    yield from _bus_families(snap.bus)


def _bus_families(counters: dict[str, int]) -> Iterator[Metric]:
    """The broker's counters (one broker run: they start again at 0 when it restarts)."""
    signals = CounterMetricFamily(
        "agentd_bus_signals", "Signals through the broker, by what happened", labels=["kind"]
    )
    for kind in SIGNAL_KINDS:
        signals.add_metric([kind], counters.get(kind, 0))
    yield signals
    now = counters.get
    yield GaugeMetricFamily(
        "agentd_bus_held",
        "Signals the broker keeps and has not handed over (hold queues, ack mailboxes)",
        value=now("held_now", 0) + now("pending_now", 0),
    )
    yield GaugeMetricFamily(
        "agentd_bus_in_flight",
        "Signals handed to ack = true agents and not yet finished",
        value=now("in_flight_now", 0),
    )
    yield CounterMetricFamily(
        "agentd_bus_redeliveries", "Deliveries after the first (ack = true)", now("redelivered", 0)
    )
    yield GaugeMetricFamily(
        "agentd_bus_dead_letters", "Signals in the dead-letter queue", now("dead_letters_now", 0)
    )
    yield CounterMetricFamily(
        "agentd_bus_malformed", "Frames the broker could not decode", now("malformed", 0)
    )


class DaemonCollector:
    """A prometheus_client collector over `take()`, which returns a fresh Snapshot."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self.take = take

    def collect(self) -> Iterator[Metric]:
        yield from families(self.take())

    def describe(self) -> Iterator[Metric]:
        """The names, for the registry's clash check (without asking the daemon)."""
        yield from families(Snapshot(agents=[], bus={}))


def make_registry(take: Callable[[], Snapshot], process: bool = True) -> CollectorRegistry:
    """A registry of its own: the daemon's collector and (`process`) its `process_*` metrics.

    Without them for node_exporter's textfile collector: node_exporter exports its own
    `process_*`, and the same series twice fail its scrape.
    """
    registry = CollectorRegistry()
    registry.register(DaemonCollector(take))
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """The daemon's metrics: the exposition for ctl, and the HTTP server if configured."""

    def __init__(
        self, snapshot: Callable[[], Awaitable[Snapshot]], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._snapshot = snapshot
        self._loop = loop
        self.registry = make_registry(self._take)
        self._textfile = make_registry(self._take, process=False)
        self._server: Any = None

    def _take(self) -> Snapshot:
        """From a scrape's thread: the snapshot, taken on the loop (never call it there)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("a metrics scrape on the event loop's own thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop)
        return future.result(SNAPSHOT_TIMEOUT)

    async def exposition(self, process: bool = True) -> str:
        """The Prometheus text format, as `ctl metrics` prints it (`--textfile`: no process_*)."""
        registry = self.registry if process else self._textfile
        return (await asyncio.to_thread(generate_latest, registry)).decode()

    def serve(self, address: str, certfile: str | None, keyfile: str | None) -> None:
        """Serve GET /metrics on HOST:PORT (HTTPS with a cert and key); OSError if it cannot.

        Always the text format, uncompressed: Prometheus asks for OpenMetrics and gzip,
        and at 10,000 agents prometheus_client's OpenMetrics encoder takes 2.5 times as
        long as the text one, and its gzip (level 9) half as long again, all of it the
        daemon's CPU. The same server and app, with the Accept header left out.
        """
        host, port = parse_address(address)
        server, _ = _start_http_server(
            port, addr=host, registry=self.registry, certfile=certfile, keyfile=keyfile
        )
        app = make_wsgi_app(self.registry, disable_compression=True)

        def text_format(environ: dict[str, Any], start_response: Any) -> Any:
            environ.pop("HTTP_ACCEPT", None)
            return app(environ, start_response)

        server.set_app(text_format)  # wsgiref's own hook
        self._server = server

    async def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)  # waits for its loop: up to 0.5 s
            server.server_close()


# --- the address ----------------------------------------------------------------------

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) as (host, port); ValueError says what is wrong."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:9650")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: [{host}] is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:9650")
    elif not _is_ipv4(host) and (
        not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit()  # 999.1.1.1
    ):
        raise ValueError(f"{text!r}: {host!r} is not an IP address or a host name")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; any other name might resolve elsewhere: not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
