"""The death signal on its own (no guard): a spawner killed with -9 takes its agent along."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentd.daemon import spawn
from tests.conftest import alive, wait_for

SPAWNER = """
import sys, time
from agentd.daemon import spawn
from agentd.daemon.spec import AgentSpec
spawn._HAVE_HELPER = sys.argv[1] == "helper"
spec = AgentSpec(name="a", pool=None, argv=("/bin/sleep", "60"), bus_agent=False)
popen = spawn.spawn(spec, 0, "ipc:///nowhere", death_signal=True)
print(popen.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["helper", "setpriv"])
def test_agent_dies_with_its_spawner(how: str) -> None:
    if how == "helper" and not spawn._HAVE_HELPER:
        pytest.fail("agentd-pdeathsig was not built (is there a C compiler?)")
    if how == "setpriv" and not spawn._SETPRIV:
        pytest.fail("setpriv (util-linux) is missing")
    parent = subprocess.Popen(
        [sys.executable, "-c", SPAWNER, how], stdout=subprocess.PIPE, text=True
    )
    agent = 0
    try:
        assert parent.stdout is not None
        agent = int(parent.stdout.readline())
        # The agent runs /bin/sleep itself: the trampoline exec'd it.
        wait_for(lambda: Path(f"/proc/{agent}/exe").resolve().name == "sleep", 5, "the exec")
        parent.kill()  # no guard here: only the death signal can take the agent down
        parent.wait()
        wait_for(lambda: not alive(agent), 5, "the agent to die with its spawner")
    finally:
        parent.kill()
        parent.wait()
        if agent and alive(agent):
            os.killpg(agent, signal.SIGKILL)


def test_helper_refuses_an_orphan() -> None:
    """If the daemon died before prctl, the parent is not the PID it was given: no agent."""
    if not spawn._HAVE_HELPER:
        pytest.fail("agentd-pdeathsig was not built (is there a C compiler?)")
    result = subprocess.run(
        [str(spawn._HELPER), "1", "/bin/echo", "ran"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 127 and "ran" not in result.stdout
    result = subprocess.run(
        [str(spawn._HELPER), str(os.getpid()), "/bin/echo", "ran"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0 and result.stdout == "ran\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_agent_runs_as_its_user_with_the_death_signal(daemon_factory) -> None:
    """`user = "nobody"`: the trampoline must be one that user can run (else setpriv)."""
    d = daemon_factory("""
[agents.low]
command = ["/bin/sleep", "60"]
user = "nobody"
start_seconds = 0.2
""").start()
    pid = d.pid("low")
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam("nobody").pw_uid
    assert Path(f"/proc/{pid}/exe").resolve().name == "sleep"
    assert d.stop() == 0
