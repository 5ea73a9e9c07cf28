"""CurveZMQ keys: there is no unauthenticated network endpoint.

An ipc endpoint is guarded by file permissions; a tcp endpoint (control or
bus) needs CurveZMQ. `agentd keys DIR` makes the daemon's key pair and a
client pair, and puts the client's public key in DIR/allowed/. The daemon
serves as a CURVE server with its secret key and lets in only clients whose
public keys are in DIR/allowed/ (zmq.auth's ZAP handler); everyone else
gets nothing at all. Which endpoints need keys: `Endpoint.needs_keys`
(bus/endpoint.py).

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


def _load_secret(secret_file: Path) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if not secret:
        raise ValueError(f"{secret_file}: no secret key in this file (a public .key?)")
    return public, secret


def server_auth(
    context: zmq.Context[Any],
    sock: zmq.Socket[Any],
    allowed_keys_dir: Path,
    secret_key_file: Path | None = None,
) -> Any:
    """Make `sock` a CURVE server admitting only the public keys in allowed_keys_dir.

    Call before bind. Starts and returns the ZAP authenticator (a
    ThreadAuthenticator, or an AsyncioAuthenticator for a zmq.asyncio context);
    the caller stops it (`auth.stop()`) before terminating the context. A client
    whose key is not allowed gets no connection and no answer.

    With secret_key_file omitted, allowed_keys_dir is an `agentd keys` directory:
    its allowed/ subdirectory and agentd.key_secret are used.
    """
    if secret_key_file is None:
        keys_dir = Path(allowed_keys_dir)
        allowed_keys_dir, secret_key_file = keys_dir / "allowed", keys_dir / f"{SERVER}.key_secret"
    allowed = Path(allowed_keys_dir)
    if not allowed.is_dir():
        raise FileNotFoundError(f"{allowed}: no such directory of allowed client keys")
    public, secret = _load_secret(Path(secret_key_file))

    import zmq.asyncio

    if isinstance(context, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth: Any = AsyncioAuthenticator(context)
    else:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(context)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(allowed))
    except BaseException:
        auth.stop()
        raise
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    return auth


def client_curve(
    sock: zmq.Socket[Any],
    client_secret_file: Path,
    server_public_file: Path | None = None,
    *,
    name: str = CLIENT,
) -> None:
    """Make `sock` a CURVE client of the daemon (call before connect).

    With server_public_file omitted, client_secret_file is an `agentd keys`
    directory: `<name>.key_secret` and agentd.key from it are used.
    """
    if server_public_file is None:
        keys_dir = Path(client_secret_file)
        client_secret_file = keys_dir / f"{name}.key_secret"
        server_public_file = keys_dir / f"{SERVER}.key"
    public, secret = _load_secret(Path(client_secret_file))
    server_public, _ = zmq.auth.load_certificate(str(server_public_file))
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public
