"""CurveZMQ: a tcp endpoint needs keys; an unknown client key gets nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest
import zmq
import zmq.asyncio

from agentd.bus.keys import (
    SERVER,
    client_curve,
    create_keypair,
    create_keys_dir,
    server_auth,
)


def test_create_keypair(tmp_path) -> None:
    public, secret = create_keypair(tmp_path / "k")
    assert public == tmp_path / "k" / "agentd.key" and public.is_file()
    assert secret == tmp_path / "k" / "agentd.key_secret" and secret.is_file()
    assert (secret.stat().st_mode & 0o777) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    other_public, _ = create_keypair(tmp_path / "k", "alice")
    assert other_public.name == "alice.key"


def test_keys_dir_layout(tmp_path) -> None:
    made = create_keys_dir(tmp_path / "keys")
    assert (made["server_secret"].stat().st_mode & 0o777) == 0o600
    assert (made["client_secret"].stat().st_mode & 0o777) == 0o600
    assert (made["allowed"] / made["client_public"].name).exists()
    assert not (made["allowed"] / made["server_public"].name).exists()


def exchange(ctx: zmq.Context, server: zmq.Socket, port: int, setups) -> list[zmq.Socket]:
    """Connect one REQ client per setup (a function configuring CURVE), each sends b"ping"."""
    clients = []
    for setup in setups:
        client = ctx.socket(zmq.REQ)
        client.setsockopt(zmq.LINGER, 0)
        setup(client)
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"ping")
        clients.append(client)
    return clients


def test_known_client_answered_unknown_client_gets_nothing(tmp_path) -> None:
    server_public, server_secret = create_keypair(tmp_path / "server", "agentd")
    allowed = tmp_path / "allowed"
    friend_public, friend_secret = create_keypair(tmp_path / "friend", "friend")
    allowed.mkdir()
    (allowed / "friend.key").write_bytes(friend_public.read_bytes())
    _, stranger_secret = create_keypair(tmp_path / "stranger", "stranger")

    threads_before = threading.active_count()
    ctx = zmq.Context()
    server = ctx.socket(zmq.REP)
    server.setsockopt(zmq.LINGER, 0)
    auth = server_auth(ctx, server, allowed, server_secret)
    assert server.curve_server
    port = server.bind_to_random_port("tcp://127.0.0.1")
    clients: list[zmq.Socket] = []
    try:
        clients = exchange(
            ctx,
            server,
            port,
            [
                lambda s: client_curve(s, friend_secret, server_public),
                lambda s: client_curve(s, stranger_secret, server_public),
            ],
        )
        assert server.poll(3000), "the allowed client's request never arrived"
        assert server.recv() == b"ping"
        server.send(b"pong")
        assert clients[0].poll(3000) and clients[0].recv() == b"pong"
        # The stranger's request never reaches the server, and nothing comes back.
        assert not server.poll(500)
        assert not clients[1].poll(500)
    finally:
        for sock in (*clients, server):
            sock.close(0)
        auth.stop()
        ctx.term()
    assert threading.active_count() <= threads_before  # the authenticator thread is gone


def test_keys_dir_form(tmp_path) -> None:
    """server_auth(ctx, sock, keys_dir) / client_curve(sock, keys_dir): the `agentd keys` layout."""
    keys = tmp_path / "keys"
    create_keys_dir(keys)
    stranger = tmp_path / "stranger"
    create_keypair(stranger, "ctl")
    (stranger / f"{SERVER}.key").write_bytes((keys / f"{SERVER}.key").read_bytes())
    ctx = zmq.Context()
    server = ctx.socket(zmq.REP)
    server.setsockopt(zmq.LINGER, 0)
    auth = server_auth(ctx, server, keys)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    clients: list[zmq.Socket] = []
    try:
        clients = exchange(
            ctx,
            server,
            port,
            [lambda s: client_curve(s, keys), lambda s: client_curve(s, stranger)],
        )
        assert server.poll(3000) and server.recv() == b"ping"
        server.send(b"pong")
        assert clients[0].poll(3000) and clients[0].recv() == b"pong"
        assert not server.poll(500)
        assert not clients[1].poll(500)
    finally:
        for sock in (*clients, server):
            sock.close(0)
        auth.stop()
        ctx.term()


def test_asyncio_context(tmp_path) -> None:
    keys = tmp_path / "keys"
    made = create_keys_dir(keys)

    async def main() -> bytes:
        actx = zmq.asyncio.Context()
        server = actx.socket(zmq.REP)
        server.setsockopt(zmq.LINGER, 0)
        auth = server_auth(actx, server, made["allowed"], made["server_secret"])
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client = actx.socket(zmq.REQ)
        client.setsockopt(zmq.LINGER, 0)
        client_curve(client, made["client_secret"], made["server_public"])
        client.connect(f"tcp://127.0.0.1:{port}")
        try:
            await client.send(b"ping")
            assert await asyncio.wait_for(server.recv(), 3) == b"ping"
            await server.send(b"pong")
            return await asyncio.wait_for(client.recv(), 3)
        finally:
            client.close(0)
            server.close(0)
            auth.stop()
            actx.term()

    assert asyncio.run(main()) == b"pong"


def test_bad_inputs_fail_early(tmp_path) -> None:
    made = create_keys_dir(tmp_path / "keys")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    try:
        with pytest.raises(FileNotFoundError):
            server_auth(ctx, sock, tmp_path / "nope", made["server_secret"])
        with pytest.raises(ValueError):  # a public key where the secret belongs
            server_auth(ctx, sock, made["allowed"], made["server_public"])
        assert not sock.curve_server
    finally:
        sock.close(0)
        ctx.term()
