"""The unit file: the directives the contract names (SPEC §8), and `systemd-analyze verify`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "agentd.service"
INSTALLED_AT = "/usr/local/bin/agentd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not installed (apt-get install systemd); CI installs it",
)


def sections(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}}; comments and blank lines skipped, keys may repeat."""
    out: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = out.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return out


def service() -> dict[str, str]:
    svc = sections(UNIT.read_text())["Service"]
    for key, values in svc.items():
        if key not in ("Environment",):
            assert len(values) == 1, f"{key}= set {len(values)} times"
    return {key: values[-1] for key, values in svc.items()}


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unsupported time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_required_directives() -> None:
    d = service()
    assert d["Type"] == "notify" and d["NotifyAccess"] == "main"
    assert d["ExecStart"] == f"{INSTALLED_AT} run --config /etc/agentd/agentd.toml"
    assert d["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert seconds(d["WatchdogSec"]) > 0
    assert d["KillMode"] == "mixed" and d["Restart"] == "on-failure"
    assert d["RuntimeDirectory"] == "agentd" and d["RuntimeDirectoryMode"] == "0750"
    assert d["LogsDirectory"] == "agentd"
    # Durable state (SPEC §10): systemd makes /var/lib/agentd and passes $STATE_DIRECTORY,
    # which is the daemon's default state_dir.
    assert d["StateDirectory"] == "agentd" and d["StateDirectoryMode"] == "0750"
    # Room for the daemon's orderly stop (daemon.shutdown_timeout defaults to 30 s).
    assert 30 < seconds(d["TimeoutStopSec"]) <= 120
    assert d["Delegate"] == "yes"
    # The daemon's default runtime dir is $RUNTIME_DIRECTORY (and /run/agentd for root,
    # where ctl looks): no environment needed for it.
    assert "XDG_RUNTIME_DIR=/run" not in d.get("Environment", "").split()
    assert sections(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


def test_hardening_leaves_agents_working() -> None:
    d = service()
    for key, value in {
        "ProtectSystem": "full",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
    }.items():
        assert d.get(key) == value, f"{key}={d.get(key)}"
    # ProtectSystem=full leaves /var writable; nothing else may make the state dir
    # read-only or hide it.
    for key in ("ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem"):
        assert "/var" not in d.get(key, ""), f"{key}= hides the state dir"
    # Each of these would break some agent; the unit's comments say which and why.
    for key in (
        "NoNewPrivileges",  # agents running setuid programs
        "User",  # no root: no user switching, and NoNewPrivileges gets implied
        "ProtectHome",  # agents living in /home
        "ProtectControlGroups",  # would make Delegate=yes read-only
        "ProtectClock",  # implies DeviceAllow=, closing GPUs and other devices
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "RestrictNamespaces",  # browser sandboxes, bubblewrap, rootless containers
        "MemoryDenyWriteExecute",  # JITs
        "SystemCallFilter",
        "RestrictAddressFamilies",
        "PrivateNetwork",
        "PrivateUsers",
    ):
        assert key not in d, f"{key}= breaks agents"


def agentd_executable() -> str:
    """An existing program to stand in for /usr/local/bin/agentd: this install's console script."""
    for candidate in (Path(sys.executable).parent / "agentd", shutil.which("agentd")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return sys.executable  # verify only checks that the program exists and is executable


def verify(unit: Path) -> tuple[int, list[str]]:
    """Exit status and the stderr lines about this unit (not the host's other units)."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    return result.returncode, [line for line in result.stderr.splitlines() if unit.name in line]


def installed_copy(tmp_path: Path, name: str = "agentd.service") -> Path:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_AT} " in text
    unit = tmp_path / name
    unit.write_text(text.replace(f"ExecStart={INSTALLED_AT} ", f"ExecStart={agentd_executable()} "))
    return unit


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path) -> None:
    code, problems = verify(installed_copy(tmp_path))
    assert code == 0 and not problems, "\n".join(problems)


@needs_systemd_analyze
def test_verify_would_catch_mistakes(tmp_path) -> None:
    """The check above means something: verify rejects a missing program, flags unknown keys."""
    missing = tmp_path / "missing.service"
    missing.write_text(UNIT.read_text().replace(INSTALLED_AT, str(tmp_path / "no-such-agentd")))
    code, problems = verify(missing)
    assert code != 0 and any("not executable" in line for line in problems), problems

    typo = installed_copy(tmp_path, "typo.service")
    typo.write_text(typo.read_text().replace("KillMode=mixed", "KillMod=mixed"))
    _, problems = verify(typo)
    assert any("KillMod" in line for line in problems), problems
