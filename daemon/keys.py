"""CurveZMQ keys: there is no unauthenticated network endpoint.

An ipc endpoint is guarded by file permissions; a tcp endpoint (control or
bus) needs CurveZMQ. `agentd keys DIR` makes the daemon's key pair and a
client pair, and puts the client's public key in DIR/allowed/. The daemon
serves as a CURVE server with its secret key and lets in only clients whose
public keys are in DIR/allowed/ (zmq.auth's ZAP handler); everyone else
gets nothing at all.

Layout of a keys dir:

    DIR/agentd.key, DIR/agentd.key_secret   the daemon's pair
    DIR/ctl.key, DIR/ctl.key_secret         a client pair (ctl, scripts)
    DIR/allowed/*.key                       public keys allowed to connect
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

SERVER = "agentd"
CLIENT = "ctl"


def create_keypair(directory: Path, name: str = SERVER) -> tuple[Path, Path]:
    """(public, secret) key files for `name` in `directory`; the secret is 0600."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def create_keys_dir(directory: Path) -> dict[str, Path]:
    """The daemon's pair, a client pair, and the client allowed in."""
    server_public, server_secret = create_keypair(directory, SERVER)
    client_public, client_secret = create_keypair(directory, CLIENT)
    allowed = directory / "allowed"
    allowed.mkdir(exist_ok=True)
    shutil.copy(client_public, allowed / client_public.name)
    os.chmod(directory, 0o700)
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "client_public": client_public,
        "client_secret": client_secret,
        "allowed": allowed,
    }


def endpoint_needs_keys(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def server_auth(context: zmq.Context[Any], sock: zmq.Socket[Any], keys_dir: Path) -> Any:
    """Make `sock` a CURVE server admitting only keys in keys_dir/allowed (before bind)."""
    import zmq.asyncio

    if isinstance(context, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth: Any = AsyncioAuthenticator(context)
    else:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys_dir / "allowed"))
    public, secret = zmq.auth.load_certificate(str(keys_dir / f"{SERVER}.key_secret"))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    return auth


def client_curve(sock: zmq.Socket[Any], keys_dir: Path, name: str = CLIENT) -> None:
    """Make `sock` a CURVE client of the daemon (before connect)."""
    public, secret = zmq.auth.load_certificate(str(keys_dir / f"{name}.key_secret"))
    server_public, _ = zmq.auth.load_certificate(str(keys_dir / f"{SERVER}.key"))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public
