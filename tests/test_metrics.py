"""Prometheus metrics (SPEC §13): live scrapes over ctl and HTTP, the config's rules, the
collector over fixed snapshots, the broker's per-agent figures, and the alert rules.

One daemon serves the live tests of this module (two `sleep` pool members, metrics on a
free loopback port); the collector and router tests need no process at all.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentd.bus.envelope import AgentEntry, Nack, Stats
from agentd.daemon.config import ConfigError, load
from agentd.daemon.metrics import (
    AgentSample,
    MetricsEndpoint,
    Snapshot,
    is_loopback,
    make_registry,
    parse_address,
)
from tests.conftest import DaemonProc, wait_for
from tests.fake_runtime import Sim, sup
from tests.test_router import Net, acked

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "etc" / "prometheus" / "agentd-rules.yml"
RULES_TEST = REPO / "tests" / "prometheus" / "agentd-rules.test.yml"

#: SPEC §13: every name, with the labels its samples carry.
AGENT_METRICS = {
    "agentd_agent_up": {"agent"},
    "agentd_agent_restarts_total": {"agent", "reason"},
    "agentd_agent_resident_memory_bytes": {"agent"},
    "agentd_agent_cpu_seconds_total": {"agent"},
    "agentd_agent_start_time_seconds": {"agent"},
}
BUS_METRICS = {
    "agentd_bus_signals_total": {"kind"},
    "agentd_bus_held": set(),
    "agentd_bus_in_flight": set(),
    "agentd_bus_redeliveries_total": set(),
    "agentd_bus_dead_letters": set(),
    "agentd_bus_malformed_total": set(),
}
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
}

#: The headers of a Prometheus scrape (2.x): OpenMetrics preferred, gzip accepted.
ASK = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> Samples:
    """Exposition text → {(sample name, labels): value}, by prometheus_client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# --- one live daemon for the module ------------------------------------------------------


class Live:
    def __init__(self, d: DaemonProc, port: int) -> None:
        self.d = d
        self.port = port

    def ctl_scrape(self) -> Samples:
        result = self.d.ctl("metrics")
        assert result.returncode == 0, result.stderr
        return parse(result.stdout)

    def http_text(self) -> str:
        """What Prometheus gets: it asks for OpenMetrics or text, gzip welcome."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics", headers=ASK)
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert r.headers["Content-Encoding"] is None  # not worth the daemon's CPU
            return r.read().decode()

    def http_scrape(self) -> Samples:
        return parse(self.http_text())

    def rows(self) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in self.d.ctl_json("status")["agents"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    port = free_port()
    d = DaemonProc(
        tmp_path_factory.mktemp("metrics"),
        f"""
        [daemon]
        metrics = "127.0.0.1:{port}"
        [agents.sleeper]
        command = ["sleep", "infinity"]
        start_seconds = 0
        replicas = 2
        """,
    )
    try:
        d.start()
        yield Live(d, port)
    finally:
        left = d.cleanup()
    assert not left, f"processes left behind: {left}"


def test_ctl_and_http_scrapes_name_every_metric_and_a_sigkill_counts_as_signal(live) -> None:
    before = live.ctl_scrape()
    key = {"agent": "sleeper@0", "reason": "signal"}
    restarts = value(before, "agentd_agent_restarts_total", **key) or 0.0
    started = value(before, "agentd_agent_start_time_seconds", agent="sleeper@0")
    pid = live.rows()["sleeper@0"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: value(live.http_scrape(), "agentd_agent_restarts_total", **key) == restarts + 1,
        10,
        "restarts_total{reason=signal} of sleeper@0 to go up by one",
    )
    wait_for(lambda: live.rows()["sleeper@0"]["state"] == "running", 10, "sleeper@0 back")
    for scrape in (live.ctl_scrape(), live.http_scrape()):
        assert value(scrape, "agentd_agent_restarts_total", **key) == restarts + 1
        assert value(scrape, "agentd_agent_up", agent="sleeper@0") == 1.0
        assert value(scrape, "agentd_agent_start_time_seconds", agent="sleeper@0") > started
        assert value(scrape, "agentd_agent_resident_memory_bytes", agent="bus") > 0
        names: dict[str, set[frozenset[str]]] = {}
        for name, labels in scrape:
            names.setdefault(name, set()).add(frozenset(k for k, _ in labels))
        for name, labels in {**AGENT_METRICS, **BUS_METRICS}.items():
            assert names.get(name) == {frozenset(labels)}, (name, names.get(name))
        assert set(names) >= PROCESS_METRICS
        agents = {dict(labels)["agent"] for name, labels in scrape if name == "agentd_agent_up"}
        assert agents == {"sleeper@0", "sleeper@1", "bus"}


def test_bus_figures_move_in_the_scrape_and_in_status(live) -> None:
    scrape = live.http_scrape()
    held = value(scrape, "agentd_bus_signals_total", kind="held")
    malformed = value(scrape, "agentd_bus_malformed_total")
    # A `sleep` agent never joins the bus: the broker holds what is sent to it.
    sent = live.d.ctl("send", "sleeper@1", "test.held")
    assert sent.returncode == 0, sent.stderr
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"garbler")  # the broker answers by name
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{live.d.runtime_dir}/bus.sock")
        sock.send(b"\xc1 not a frame")
        assert sock.poll(5000), "the broker answers a malformed frame with an error"
    finally:
        sock.close(0)
        ctx.term()
    scrape = live.http_scrape()
    assert value(scrape, "agentd_bus_signals_total", kind="held") == held + 1
    assert value(scrape, "agentd_bus_malformed_total") == malformed + 1
    assert value(scrape, "agentd_bus_held") >= 1
    rows = live.rows()
    assert rows["sleeper@1"]["held"] == 1 and rows["sleeper@1"]["in_flight"] == 0
    assert rows["sleeper@0"]["held"] == 0
    assert rows["bus"]["held"] == value(scrape, "agentd_bus_held")


def test_textfile_scrape_leaves_out_the_process_metrics(live) -> None:
    result = live.d.ctl("metrics", "--textfile")
    assert result.returncode == 0, result.stderr
    names = {name for name, _ in parse(result.stdout)}
    assert "agentd_agent_up" in names and "agentd_bus_held" in names
    assert not [n for n in names if n.startswith("process_")]


def test_every_metric_in_the_alert_rules_is_in_a_live_scrape(live) -> None:
    used = set(re.findall(r"\bagentd_[a-z_]+", RULES.read_text()))
    assert {"agentd_agent_restarts_total", "agentd_agent_up"} <= used
    # A restart series exists from an agent's first restart on: make one (this test may
    # run alone, or on another pytest-xdist worker than the SIGKILL test above).
    key = {"agent": "sleeper@0", "reason": "signal"}
    before = value(live.http_scrape(), "agentd_agent_restarts_total", **key)
    os.kill(live.rows()["sleeper@0"]["pid"], signal.SIGKILL)
    wait_for(
        lambda: value(live.http_scrape(), "agentd_agent_restarts_total", **key) != before,
        10,
        "a restart of sleeper@0 in the scrape",
    )
    wait_for(lambda: live.rows()["sleeper@0"]["state"] == "running", 10, "sleeper@0 back")
    scraped = {name for name, _ in live.http_scrape()}
    assert used <= scraped, used - scraped


def test_ctl_metrics_without_a_daemon_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "ctl", "--config", str(config), "metrics"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3 and "no agentd answering" in result.stderr


# --- the alert rules -------------------------------------------------------------------


def test_the_readme_shows_the_alert_rules_file_as_it_is() -> None:
    assert RULES.read_text() in (REPO / "README.md").read_text()


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's `prometheus`")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    result = subprocess.run(
        [promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- config ------------------------------------------------------------------------------


def write_config(tmp_path: Path, daemon: str) -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(
        f'[daemon]\nruntime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'{daemon}\n[agents.a]\ncommand = ["true"]\n'
    )
    return path


def issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return [str(i) for i in caught.value.issues]


def test_check_rejects_a_non_loopback_metrics_address_without_tls(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'metrics = "0.0.0.0:9650"')
    result = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"{path}:4: daemon.metrics: 0.0.0.0:9650 is not a loopback address" in result.stderr
    assert "TLS" in result.stderr


def test_metrics_config_keys(tmp_path: Path) -> None:
    assert load(write_config(tmp_path, "")).daemon.metrics is None  # off by default
    spec = load(write_config(tmp_path, 'metrics = "127.0.0.1:9650"'))
    assert spec.daemon.metrics == "127.0.0.1:9650" and spec.daemon.metrics_tls_cert is None
    for bad, where, why in (
        ('metrics = "9650"', ":4: daemon.metrics:", "give HOST:PORT"),
        ('metrics = "127.0.0.1:0"', ":4: daemon.metrics:", "the port must be"),
        ('metrics = "127.0.0.1:http"', ":4: daemon.metrics:", "the port must be"),
        ('metrics = "::1:9650"', ":4: daemon.metrics:", "in brackets"),
        ('metrics = "999.1.1.1:9650"', ":4: daemon.metrics:", "not an IP address"),
        ('metrics = "[::1]:9650"\nmetrics_tls_cert = "c.pem"', ":5: ", "cannot read"),
    ):
        found = issues(write_config(tmp_path, bad))
        assert any(where in i and why in i for i in found), (bad, found)
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    path = write_config(tmp_path, 'metrics = "[::1]:9650"\nmetrics_tls_cert = "c.pem"')
    assert issues(path) == [f"{path}:5: daemon.metrics_tls_cert needs daemon.metrics_tls_key too"]
    tls = 'metrics = "0.0.0.0:9650"\nmetrics_tls_cert = "c.pem"\nmetrics_tls_key = "k.pem"'
    spec = load(write_config(tmp_path, tls))  # relative to the config file
    assert spec.daemon.metrics_tls_cert == str(tmp_path / "c.pem")
    assert spec.daemon.metrics_tls_key == str(tmp_path / "k.pem")


def test_addresses() -> None:
    assert parse_address("127.0.0.1:9650") == ("127.0.0.1", 9650)
    assert parse_address("[::1]:9650") == ("::1", 9650)
    assert parse_address("metrics.example:443") == ("metrics.example", 443)
    for loop in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert is_loopback(loop), loop
    for other in ("0.0.0.0", "::", "10.1.2.3", "metrics.example", "localhost.example"):
        assert not is_loopback(other), other


# --- the collector over fixed snapshots ------------------------------------------------------


SNAP = Snapshot(
    agents=[
        AgentSample(
            "worker@0",
            up=True,
            restarts={"signal": 2, "hung": 1},
            rss=4096,
            cpu_seconds=1.5,
            start_time=1_700_000_000.25,
        ),
        AgentSample("audit", up=False, restarts={}),
    ],
    bus={
        "routed": 7,
        "held": 3,
        "held_now": 2,
        "pending_now": 5,
        "in_flight_now": 4,
        "redelivered": 1,
        "dead_letters_now": 6,
        "malformed": 9,
    },
)


def exposition(snap: Snapshot) -> str:
    return generate_latest(make_registry(lambda: snap)).decode()


def test_collector_exposes_a_snapshot() -> None:
    samples = parse(exposition(SNAP))
    assert value(samples, "agentd_agent_up", agent="worker@0") == 1.0
    assert value(samples, "agentd_agent_up", agent="audit") == 0.0
    assert value(samples, "agentd_agent_restarts_total", agent="worker@0", reason="signal") == 2
    assert value(samples, "agentd_agent_restarts_total", agent="worker@0", reason="hung") == 1
    assert value(samples, "agentd_agent_resident_memory_bytes", agent="worker@0") == 4096
    assert value(samples, "agentd_agent_cpu_seconds_total", agent="worker@0") == 1.5
    assert value(samples, "agentd_agent_start_time_seconds", agent="worker@0") == 1_700_000_000.25
    # No process: no memory, CPU or start time; never restarted: no restart series.
    assert not [k for k in samples if ("agent", "audit") in k[1] and k[0] != "agentd_agent_up"]
    assert value(samples, "agentd_bus_signals_total", kind="routed") == 7
    assert value(samples, "agentd_bus_signals_total", kind="dropped") == 0
    assert value(samples, "agentd_bus_held") == 7  # hold queues and ack mailboxes
    assert value(samples, "agentd_bus_in_flight") == 4
    assert value(samples, "agentd_bus_redeliveries_total") == 1
    assert value(samples, "agentd_bus_dead_letters") == 6
    assert value(samples, "agentd_bus_malformed_total") == 9
    assert value(samples, "process_open_fds") > 0


def test_a_broker_that_did_not_answer_leaves_the_bus_metrics_out() -> None:
    names = {name for name, _ in parse(exposition(Snapshot(SNAP.agents, bus=None)))}
    assert "agentd_agent_up" in names
    assert not [n for n in names if n.startswith("agentd_bus_")]


def test_https_endpoint_serves_the_exposition(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def snapshot() -> Snapshot:
        return SNAP

    endpoint = MetricsEndpoint(snapshot, loop)
    port = free_port()
    try:
        endpoint.serve(f"127.0.0.1:{port}", str(cert), str(key))
        context = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=10) as r:
            samples = parse(r.read().decode())
        assert value(samples, "agentd_agent_up", agent="worker@0") == 1.0
        with pytest.raises(OSError):  # no plain HTTP on a TLS endpoint
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        asyncio.run_coroutine_threadsafe(endpoint.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- the broker's per-agent figures ------------------------------------------------------------


def test_router_counts_held_pending_in_flight_and_dead_per_agent() -> None:
    net = Net(acked("w", max_in_flight=1, max_deliveries=1), AgentEntry(name="away"))
    net.agent("w")
    sigs = [net.post("c", "w") for _ in range(3)]
    net.post("c", "away")
    net.post("c", "away")
    [first] = net.signals("w")
    assert first.id == sigs[0].id
    net.send("w", Nack([first.id], error="boom"))  # max_deliveries = 1: dead at once
    figures = net.router.agent_stats()
    assert figures["away"].held == 2 and figures["away"].pending == 0
    w = figures["w"]
    assert (w.in_flight, w.pending, w.dead_letters, w.held) == (1, 1, 1, 0)
    assert "c" not in figures  # nothing for it: left out
    totals = net.router.stats()
    assert sum(f.held + f.pending for f in figures.values()) == (
        totals["held_now"] + totals["pending_now"]
    )
    # Asked over the wire, by the daemon as by anyone: only with per_agent.
    net.send("agentd", Stats(per_agent=True))
    [answer] = [f for f in net.take("agentd") if isinstance(f, Stats)]
    assert answer.agents == figures and answer.counters["held_now"] == 2
    net.send("c", Stats())
    [plain] = [f for f in net.take("c") if isinstance(f, Stats)]
    assert plain.agents == {} and plain.counters["held_now"] == 2


# --- restarts by reason: counted where the tree decides them ----------------------------------


def test_the_tree_counts_restarts_by_the_reason_of_the_exit_before_each() -> None:
    sim = Sim.make(
        [
            sup("root", ["g", "c"], max_restarts=100, max_seconds=1),
            sup("g", ["a", "b"], "one_for_all", max_restarts=100, max_seconds=1),
        ],
        agents={"c": ("permanent", 5.0)},
    ).start()
    tree = sim.tree
    for reason in ("signal", "signal", "hung", "memory"):
        sim.now += 2
        sim.crash("a", reason=reason)
    assert sim.view.child("a").restarts_by_reason == {"signal": 2, "hung": 1, "memory": 1}
    assert sim.view.child("b").restarts_by_reason == {"stopped": 4}  # one_for_all stopped it
    assert sim.view.child("a").restarts == 4  # what `status` shows: the sum
    sim.apply(tree.restart_child("a", sim.now))  # ctl restart
    assert sim.view.child("a").restarts_by_reason["stopped"] == 1
    sim.crash("c", reason="signal")
    sim.advance(6)  # its restart_delay
    assert sim.view.child("c").restarts_by_reason == {"signal": 1}
    sim.crash("c", reason="signal")  # backing off again ...
    sim.apply(tree.stop_child("c", sim.now))  # ... ctl stops it meanwhile, then starts it
    sim.apply(tree.start_child("c", sim.now))
    assert sim.view.child("c").restarts_by_reason == {"signal": 1, "stopped": 1}
