"""The unit file: the directives the contract names, and `systemd-analyze verify`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "agentd.service"


def directives() -> dict[str, str]:
    out = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_required_directives() -> None:
    d = directives()
    assert d["Type"] == "notify" and d["NotifyAccess"] == "main"
    assert d["ExecStart"].endswith("agentd run --config /etc/agentd/agentd.toml")
    assert "-HUP" in d["ExecReload"]
    assert d["KillMode"] == "mixed" and d["Restart"] == "on-failure"
    assert d["RuntimeDirectory"] == "agentd" and d["LogsDirectory"] == "agentd"
    assert int(d["WatchdogSec"]) > 0
    assert "NoNewPrivileges" not in d  # would break agents that use setuid helpers


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path) -> None:
    # verify checks that ExecStart's program exists: point it at this install's agentd.
    agentd = Path(sys.executable).parent / "agentd"
    assert agentd.exists()
    unit = tmp_path / "agentd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/agentd", str(agentd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        if "agentd.service" in line and "Documentation" not in line
    ]
    assert result.returncode == 0 and not problems, result.stderr
