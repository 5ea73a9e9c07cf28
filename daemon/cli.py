"""The `agentd` command line: run, check, ctl, keys.

Imports are deferred into each command: `agentd ctl status` must not pay for
the daemon's modules (asyncio, psutil, structlog), which keeps it fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__
from .ctl import ctl

CONFIG_HELP = "Config file (default: $AGENTD_CONFIG, ./agentd.toml, /etc/agentd/agentd.toml)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agentd")
def main() -> None:
    """agentd: supervise agent processes under an OTP-style tree, joined by a ZeroMQ bus."""


@main.command()
@click.option("--config", "config_path", metavar="PATH", help=CONFIG_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="auto: console on a terminal, JSON lines otherwise.",
)
def run(config_path: str | None, log_format: str) -> None:
    """Run the daemon in the foreground (what systemd starts)."""
    from agentd.bus.log import configure

    from .config import ConfigError, find_config, load

    configure(log_format)  # type: ignore[arg-type]
    try:
        path = find_config(config_path)
        spec = load(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(1)
    from .service import run_daemon

    sys.exit(run_daemon(spec, str(path)))


@main.command()
@click.option("--config", "config_path", metavar="PATH", help=CONFIG_HELP)
def check(config_path: str | None) -> None:
    """Validate the config: print every error as FILE:LINE: message; exit 0 or 1."""
    from .config import ConfigError, find_config, load

    try:
        path = find_config(config_path)
        spec = load(path)
    except ConfigError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        sys.exit(1)
    if not _isolation_ok(str(path), spec):
        sys.exit(1)
    counts = f"{len(spec.agents)} agents, {len(spec.supervisors)} supervisors"
    if spec.templates:  # agents a dynamic supervisor spawns from, not started on their own
        counts += f", {len(spec.templates)} templates"
    click.echo(f"{path}: ok ({counts})")


def _isolation_ok(path: str, spec: Any) -> bool:
    """The isolation `run` would get here (SPEC §11), said before it starts; touches nothing.

    `required` on a host without a usable cgroup tree is an error at its line.
    """
    from pathlib import Path

    from .cgroup import probe, tag_for
    from .config import LineIndex

    daemon = spec.daemon
    mode, detail = probe(daemon.cgroup, daemon.cgroup_root, tag_for(daemon.runtime_dir))
    if mode == "cgroup":
        click.echo(f"isolation: a cgroup per agent ({detail})")
        return True
    if daemon.cgroup == "required":
        line = LineIndex(Path(path).read_text()).line("daemon", "cgroup")
        click.echo(f"{path}:{line}: daemon.cgroup = required, but {detail}", err=True)
        return False
    sampled = f"memory_mb sampled every {daemon.memory_check_interval:g} s"
    click.echo(f"isolation: process groups ({detail}; {sampled}, pids and cpu_percent not kept)")
    return True


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
def keys(directory: str) -> None:
    """Create CurveZMQ keys in DIRECTORY for a tcp control or bus endpoint."""
    from pathlib import Path

    from agentd.bus.keys import create_keys_dir

    made = create_keys_dir(Path(directory))
    click.echo(f"daemon key pair: {made['server_public']} (+ _secret)")
    click.echo(
        f"client key pair: {made['client_public']} (+ _secret), allowed in {made['allowed']}"
    )
    click.echo(f'set daemon.keys_dir = "{Path(directory).resolve()}" in the config')


main.add_command(ctl)


if __name__ == "__main__":
    main()
