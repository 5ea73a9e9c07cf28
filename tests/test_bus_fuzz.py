"""Garbage at a live broker: counted and dropped, and it keeps routing."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.bus import BusError, Client
from agentd.bus.envelope import Stats, encoder, peer_decoder
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    endpoint = f"ipc://{tmp}/bus.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentd.bus.broker",
            "--endpoint",
            endpoint,
            "--max-frame",
            "65536",
            "--log-format",
            "json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: os.path.exists(f"{tmp}/bus.sock"), 10, "the broker to bind")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"fuzzer")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rx = Client(endpoint, name="rx")
    tx = Client(endpoint, name="tx")
    yield endpoint, sock, rx, tx, proc
    for c in (rx, tx):
        c.close()
    sock.close(0)
    ctx.term()
    proc.terminate()
    assert proc.wait(10) == 0


def stats(sock) -> dict[str, int]:
    sock.send(encoder().encode(Stats()))
    dec = peer_decoder()
    while True:
        assert sock.poll(5000), "the broker stopped answering"
        frame = dec.decode(sock.recv())
        if isinstance(frame, Stats):
            return frame.counters


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
kinds = st.sampled_from(["signal", "batch", "hello", "ack", "table", "nope", "receipt", 3, None])
frames = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(
            ["kind", "id", "type", "to", "source", "signals", "ids", "name", "time", "data"]
        ),
        values,
        max_size=6,
    ).map(lambda d: msgspec.msgpack.encode(d)),
    st.builds(
        lambda k, extra: msgspec.msgpack.encode({"kind": k, **extra}),
        kinds,
        st.dictionaries(st.text(max_size=6), values, max_size=4),
    ),
    st.just(msgspec.msgpack.encode({"kind": "signal", "id": "big", "data": "x" * 70_000})),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(frames, min_size=1, max_size=10))
def test_generated_frames_never_break_the_broker(broker, batch) -> None:
    _endpoint, sock, rx, tx, proc = broker
    before = stats(sock)
    for payload in batch:
        sock.send_multipart([payload])
        sock.send_multipart([b"two", b"frames", b"three"])  # malformed, always
    tx.send("rx", "still.alive", 1)
    got = rx.receive(timeout=5)
    assert got is not None and got.type == "still.alive"
    assert proc.poll() is None
    after = stats(sock)  # the same socket as the garbage: it is all counted by now
    assert after["malformed"] >= before["malformed"] + len(batch)
    assert after["received"] >= before["received"] + 2 * len(batch)


def test_malformed_and_oversized_are_counted_and_answered(broker) -> None:
    endpoint, sock, _rx, _tx, _proc = broker
    before = stats(sock)
    sock.send(b"\xff\x00 not msgpack")
    sock.send(b"x" * 70_000)
    after = stats(sock)
    assert after["malformed"] == before["malformed"] + 1
    assert after["oversized"] == before["oversized"] + 1
    with pytest.raises(BusError, match="too large"):
        Client(endpoint, name="big").send("rx", "big", "y" * 70_000)


def test_spoofed_source_is_refused(broker) -> None:
    _endpoint, sock, _rx, _tx, _proc = broker
    from agentd.bus.envelope import signal

    sock.send(encoder().encode(signal("x", 1, "someone-else", to="rx", receipt=True)))
    dec = peer_decoder()
    assert sock.poll(5000)
    frames = [dec.decode(sock.recv())]
    while sock.poll(200):
        frames.append(dec.decode(sock.recv()))
    assert any(
        getattr(f, "ok", True) is False and "not your name" in (f.error or "") for f in frames
    )
