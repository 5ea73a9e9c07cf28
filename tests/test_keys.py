"""CurveZMQ: a tcp endpoint needs keys; an unknown client key gets nothing."""

from __future__ import annotations

import shutil

import zmq

from agentd.daemon.keys import SERVER, client_curve, create_keypair, create_keys_dir, server_auth


def test_keys_dir_layout(tmp_path) -> None:
    made = create_keys_dir(tmp_path / "keys")
    assert (made["server_secret"].stat().st_mode & 0o777) == 0o600
    assert (made["allowed"] / made["client_public"].name).exists()


def test_known_client_answered_unknown_client_gets_nothing(tmp_path) -> None:
    keys = tmp_path / "keys"
    create_keys_dir(keys)
    stranger = tmp_path / "stranger"
    create_keypair(stranger, "ctl")
    shutil.copy(keys / f"{SERVER}.key", stranger / f"{SERVER}.key")  # knows the server
    ctx = zmq.Context()
    server = ctx.socket(zmq.REP)
    auth = server_auth(ctx, server, keys)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    clients = []
    try:
        for directory in (keys, stranger):
            client = ctx.socket(zmq.REQ)
            client.setsockopt(zmq.LINGER, 0)
            client_curve(client, directory)
            client.connect(f"tcp://127.0.0.1:{port}")
            client.send(b"ping")
            clients.append(client)
        assert server.poll(3000)
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
