"""The built wheel installs into a fresh venv and its console script runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    wheel = next(dist.glob("agentd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # One namespace: nothing generic (daemon/, bus/, agents/) at the top of site-packages.
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"agentd", next(n for n in tops if n.endswith(".dist-info"))}, tops
    assert "agentd/daemon/guard.py" in names and "agentd/bus/__init__.py" in names
    # The death-signal trampoline is compiled into the wheel, executable.
    helper = zipfile.ZipFile(wheel).getinfo("agentd/daemon/agentd-pdeathsig")
    assert (helper.external_attr >> 16) & 0o111
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
        check=True,
        timeout=120,
    )
    # --system-site-packages lends the dependencies (no network needed); --no-deps
    # and --force-reinstall put this wheel, not the editable checkout, in the venv.
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    result = subprocess.run(
        [str(venv / "bin" / "agentd"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "agentd, version 0.1.0" in result.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import agentd.daemon; print(agentd.daemon.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert str(venv) in where.stdout, where.stdout
    installed = Path(where.stdout.strip()).with_name("agentd-pdeathsig")
    assert os.access(installed, os.X_OK)
