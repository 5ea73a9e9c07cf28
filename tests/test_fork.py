"""Warm starts (SPEC §12): module agents forked from a template process.

The agent module is written into the test's own directory, so a test can change
its code on disk. Each agent answers `whoami` with what it is as a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from agentd.daemon.config import ConfigError, load
from tests.conftest import alive, wait_for

ROOT = Path(__file__).resolve().parent.parent

MODULE = """
import os, signal, time

from agentd.agents import Agent, on

VERSION = {version!r}


class Who(Agent):
    def setup(self):
        if os.environ.get("GRANDCHILD"):  # a child that ignores SIGTERM and outlives nothing
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    time.sleep(60)
            path = os.path.join(os.environ["REC_DIR"], self.name + ".grandchild")
            with open(path, "a") as f:
                f.write(f"{{pid}}\\n")

    @on("whoami")
    def whoami(self, signal, ctx):
        return {{
            "version": VERSION,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pgid": os.getpgid(0),
            "sid": os.getsid(0),
            "name": os.environ["AGENTD_NAME"],
            "stdin": os.readlink("/proc/self/fd/0"),
        }}
"""


def write_module(directory: Path, version: str) -> None:
    # A different length each time: a .pyc is checked by the source's mtime and size.
    (directory / "who.py").write_text(MODULE.format(version=version))


def config(directory: Path, *extra: str) -> str:
    return textwrap.dedent(
        f"""
        [agents.a]
        module = "who:Who"
        cwd = "{directory}"
        env = {{ GRANDCHILD = "1", REC_DIR = "{directory / "rec"}" }}
        [agents.b]
        module = "who:Who"
        cwd = "{directory}"
        replicas = 2
        """
    ) + "\n".join(extra)


def whoami(d, name: str) -> dict:
    result = d.ctl("request", name, "whoami")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def templates(d) -> list[int]:
    """The live template processes (forked agents share their command line: not them)."""
    assert d.popen is not None
    started = {e["pid"] for e in d.events("template.started")}
    return [c.pid for c in psutil.Process(d.popen.pid).children() if c.pid in started]


@pytest.fixture
def forked(daemon_factory, tmp_path):
    write_module(tmp_path, "v1")
    return daemon_factory(config(tmp_path)).start()


def test_a_forked_agent_is_the_daemons_child_in_its_own_session(forked) -> None:
    d = forked
    me = whoami(d, "a")
    assert me["version"] == "v1" and me["name"] == "a"
    assert me["ppid"] == d.popen.pid  # reparented to the daemon (a subreaper)
    assert me["pgid"] == me["sid"] == me["pid"] == d.pid("a")
    assert me["stdin"] == "/dev/null"
    assert whoami(d, "b@1")["name"] == "b@1"
    assert len(templates(d)) == 2  # a's env differs; b@0 and b@1 share one
    log = d.runtime_dir / "log" / "a.log"  # its stderr is the daemon's pipe, passed over
    wait_for(lambda: log.exists() and "agent.ready" in log.read_text(), 5, "the SDK's log line")


def test_a_forked_agents_grandchild_dies_with_it(forked) -> None:
    d = forked
    path = d.dir / "a.grandchild"
    grandchild = int(wait_for(lambda: path.exists() and path.read_text().split(), 5)[0])
    assert alive(grandchild)
    os.kill(d.pid("a"), signal.SIGKILL)
    d.wait_event("agent.ready", "a", count=2)
    wait_for(lambda: not alive(grandchild), 5, "the grandchild to die with its agent")


def test_kill_9_of_the_daemon_leaves_no_forked_agent(forked) -> None:
    d = forked
    path = d.dir / "a.grandchild"
    wait_for(lambda: path.exists() and path.read_text().split(), 5, "the grandchild")
    pids = [d.pid(n) for n in ("a", "b@0", "b@1")]
    pids += [int(p) for p in path.read_text().split()] + templates(d)
    assert all(alive(p) for p in pids)
    d.signal(signal.SIGKILL)
    d.wait()
    wait_for(lambda: not any(alive(p) for p in pids), 5, "every forked process to be gone")


def test_the_template_killed_kills_no_agent_and_the_next_start_works(forked) -> None:
    d = forked
    before = {n: d.pid(n) for n in ("a", "b@0", "b@1")}
    old = set(templates(d))
    for template in old:
        os.kill(template, signal.SIGKILL)
    wait_for(lambda: len(set(templates(d)) - old) == 2, 10, "new templates")
    assert all(alive(p) for p in before.values())
    assert whoami(d, "b@0")["pid"] == before["b@0"]
    assert not d.events("agent.exited")
    os.kill(before["a"], signal.SIGKILL)  # the tree restarts it: forked from the new one
    d.wait_event("agent.ready", "a", count=2)
    assert whoami(d, "a")["pid"] == d.pid("a") != before["a"]


def test_code_changed_on_disk_and_ctl_restart_runs_the_new_code(forked, tmp_path) -> None:
    d = forked
    assert whoami(d, "b@0")["version"] == "v1"
    write_module(tmp_path, "v2, changed")
    assert whoami(d, "b@0")["version"] == "v1"  # running code is what was imported
    result = d.ctl("restart", "b")
    assert result.returncode == 0, result.stderr
    assert whoami(d, "b@0")["version"] == whoami(d, "b@1")["version"] == "v2, changed"
    # A reload that changes the agent's spec re-makes its template too.
    write_module(tmp_path, "v3, changed again")
    d.rewrite(config(tmp_path, "heartbeat = 5.0"))  # b's spec changes, a's does not
    result = d.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert whoami(d, "b@1")["version"] == "v3, changed again"
    assert whoami(d, "a")["version"] == "v1"  # not restarted: still what it imported


def test_a_module_that_fails_to_import_is_start_failed_with_its_traceback(
    daemon_factory, tmp_path
) -> None:
    (tmp_path / "broken.py").write_text("import os\nraise RuntimeError('no import for you')\n")
    d = daemon_factory(
        f"""
[agents.broken]
module = "broken:Nope"
cwd = "{tmp_path}"
"""
    ).start(wait_ready=False)
    assert d.wait(30) == 1
    exited = d.events("agent.exited", "broken")[0]
    assert exited["reason"] == "start_failed"
    assert any("broken.py" in line for line in exited["stderr_tail"])  # the last lines
    assert exited["stderr_tail"][-1] == "RuntimeError: no import for you"


def test_a_module_that_starts_a_thread_at_import_cannot_be_forked(daemon_factory, tmp_path):
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "from agentd.agents import Agent\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "class T(Agent):\n    pass\n"
    )
    d = daemon_factory(
        f"""
[agents.t]
module = "threaded:T"
cwd = "{tmp_path}"
"""
    ).start(wait_ready=False)
    assert d.wait(30) == 1
    exited = d.events("agent.exited", "t")[0]
    assert exited["reason"] == "start_failed"
    assert "started 1 thread(s)" in exited["stderr_tail"][-1]
    assert 'start = "exec"' in exited["stderr_tail"][-1]


def test_a_fork_request_writes_the_cgroup_files_first_or_says_why_not(tmp_path) -> None:
    """The template protocol alone, from a process that is not a subreaper (not a daemon)."""
    from agentd.agents.template import Forked, ForkRequest, Hello, decoder, encode

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    module, fd = "tests.bus_agents:Recorder", str(theirs.fileno())
    template = subprocess.Popen(
        [sys.executable, "-m", "agentd.agents.template", module, fd],
        pass_fds=(theirs.fileno(),),
        cwd=ROOT,
    )
    theirs.close()
    try:
        ours.settimeout(30)
        assert isinstance(decoder.decode(ours.recv(1 << 20)), Hello)

        def fork(cgroup_procs: list[str]) -> Forked:
            out, err = os.pipe(), os.pipe()
            env = {"AGENTD_BUS": "ipc:///nonexistent", "PATH": os.environ["PATH"]}
            # A daemon pid that is not its parent: it must exit before any agent code.
            request = ForkRequest("x", 0, 1, env, cgroup_procs=cgroup_procs)
            socket.send_fds(ours, [encode(request)], [out[1], err[1]])
            for fd in (*out, *err):
                os.close(fd)
            return decoder.decode(ours.recv(1 << 20))

        refused = fork([str(tmp_path / "no" / "cgroup.procs")])
        assert refused.pid == 0 and "FileNotFoundError" in (refused.error or "")
        procs = tmp_path / "cgroup.procs"
        forked = fork([str(procs)])
        assert forked.error is None and procs.read_text() == str(forked.pid)
        # Born our child (CLONE_PARENT: the template's parent), not the "daemon" it was
        # told of: it exits before any agent code.
        _, status = os.waitpid(forked.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1
    finally:
        ours.close()  # EOF: the template exits
        template.wait(10)


def refused(tmp_path: Path, agent: str) -> tuple[Path, str]:
    """Write a config with `agent` as [agents.c]; the path and its first error."""
    path = tmp_path / "agentd.toml"
    path.write_text(
        f'[daemon]\nruntime_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
        f"[agents.c]\n{agent}"
    )
    with pytest.raises(ConfigError) as error:
        load(str(path))
    return path, str(error.value.issues[0])


def test_start_fork_for_a_command_agent_is_a_config_error(tmp_path) -> None:
    path, issue = refused(tmp_path, 'command = ["true"]\nstart = "fork"\n')
    assert f"{path}:6:" in issue
    assert 'start: "fork" needs a module agent' in issue
    path.write_text(path.read_text().replace('command = ["true"]', 'module = "m:C"'))
    assert load(str(path)).agents["c"].start == "fork"
    path.write_text(path.read_text().replace('start = "fork"', 'start = "exec"'))
    assert load(str(path)).agents["c"].start == "exec"
    path.write_text(path.read_text().replace('start = "exec"\n', ""))
    assert load(str(path)).agents["c"].start == "fork"  # the default for a module agent


def test_a_second_sigterm_ends_a_daemon_of_many_forked_agents(daemon_factory, tmp_path) -> None:
    """kill_all with 150 agents: every exit is seen (one reaper loop, not one per exit)."""
    write_module(tmp_path, "v1")
    d = daemon_factory(
        f'[agents.many]\nmodule = "who:Who"\ncwd = "{tmp_path}"\nreplicas = 150\n'
    ).start()
    pids = [d.pid(f"many@{i}") for i in range(150)]
    d.signal(signal.SIGTERM)
    d.wait_event("daemon.stopping")
    d.signal(signal.SIGTERM)
    d.wait(30)
    assert d.events("daemon.kill_all")
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every agent to be gone")
    assert not [e for e in d.events() if e.get("event") == "reaper.callback_failed"]


def test_a_template_forks_a_bounded_number_then_its_warm_successor_takes_over(
    daemon_factory, tmp_path
) -> None:
    """Past FORKS_PER_TEMPLATE forks a fresh template takes over; the old one exits and
    every agent it forked lives on (an agent's start was dearer the more shared one)."""
    from agentd.daemon.forkserver import FORKS_PER_TEMPLATE

    write_module(tmp_path, "v1")
    n = FORKS_PER_TEMPLATE + 20
    d = daemon_factory(
        f'[agents.many]\nmodule = "who:Who"\ncwd = "{tmp_path}"\nreplicas = {n}\n'
    ).start()
    started = [e["pid"] for e in d.events("template.started")]
    assert len(started) == 2  # the successor, started half way, took over
    wait_for(lambda: not alive(started[0]), 10, "the used-up template to exit")
    assert templates(d) == [started[1]]
    pids = {d.pid(f"many@{i}") for i in range(n)}
    assert len(pids) == n and all(alive(p) for p in pids)
    assert whoami(d, "many@0")["ppid"] == whoami(d, f"many@{n - 1}")["ppid"] == d.popen.pid
    assert not d.events("agent.exited")


def ksm_merge_any(pid: int) -> bool | None:
    """/proc/PID/ksm_stat's `ksm_merge_any` (None: this kernel does not show it)."""
    try:
        lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    except FileNotFoundError:
        return None
    values = {k.rstrip(":"): v for k, v in (line.split(None, 1) for line in lines if " " in line)}
    return None if "ksm_merge_any" not in values else values["ksm_merge_any"] == "yes"


@pytest.mark.skipif(ksm_merge_any(os.getpid()) is None, reason="kernel without ksm_merge_any")
def test_memory_ksm_makes_a_forked_agents_memory_mergeable_and_only_its(
    daemon_factory, tmp_path
) -> None:
    write_module(tmp_path, "v1")
    d = daemon_factory(config(tmp_path, "memory_ksm = true")).start()  # b's key
    assert ksm_merge_any(d.pid("b@0")) is ksm_merge_any(d.pid("b@1")) is True
    assert ksm_merge_any(d.pid("a")) is False
    assert not any(ksm_merge_any(t) for t in templates(d))  # agents only: set after the clone
    log = d.runtime_dir / "log" / "b@0.log"
    assert "memory_ksm" not in (log.read_text() if log.exists() else "")  # the kernel took it


def test_memory_ksm_for_an_exec_agent_is_a_config_error(tmp_path) -> None:
    path, issue = refused(tmp_path, 'module = "m:C"\nstart = "exec"\nmemory_ksm = true\n')
    assert f"{path}:7:" in issue
    assert "memory_ksm: only a forked agent" in issue
    path.write_text(path.read_text().replace('start = "exec"\n', ""))
    assert load(str(path)).agents["c"].memory_ksm  # a module agent forks by default


TALKER = """
import sys

from agentd.agents import Agent


class Talk(Agent):
    def setup(self):
        print("a line on stdout", flush=True)
        print("a line on stderr", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("start", ["fork", "exec"])
def test_redirect_stderr_is_one_pipe_for_both_streams(daemon_factory, tmp_path, start) -> None:
    (tmp_path / "talk.py").write_text(TALKER)
    d = daemon_factory(
        f'[agents.t]\nmodule = "talk:Talk"\ncwd = "{tmp_path}"\nstart = "{start}"\n'
        "redirect_stderr = true\n"
        f'[agents.u]\nmodule = "talk:Talk"\ncwd = "{tmp_path}"\nstart = "{start}"\n'
    ).start()
    one, two = (os.readlink(f"/proc/{d.pid('t')}/fd/{fd}") for fd in (1, 2))
    assert one == two and one.startswith("pipe:")
    assert len({os.readlink(f"/proc/{d.pid('u')}/fd/{fd}") for fd in (1, 2)}) == 2
    os.kill(d.pid("t"), signal.SIGKILL)
    tail = d.wait_event("agent.exited", "t")["stderr_tail"]
    assert "a line on stdout" in tail and "a line on stderr" in tail  # both streams, in one
    text = (d.runtime_dir / "log" / "t.log").read_text()
    assert "a line on stdout" in text and "a line on stderr" in text
    d.wait_event("agent.ready", "t", count=2)  # restarted, and still one pipe
    assert len({os.readlink(f"/proc/{d.pid('t')}/fd/{fd}") for fd in (1, 2)}) == 1
