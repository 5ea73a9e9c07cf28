"""A cgroup per agent (SPEC §11): the pure part on fake trees, then real daemons as root.

The real tests run on whatever this host has: on the development machine a hybrid
layout (cgroup2 at /sys/fs/cgroup/unified for kill and freeze, v1 memory, pids and
cpu), on current distributions pure cgroup2. They need root and a writable tree;
without one they fail rather than pass vacuously (the fallback has its own tests).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from agentd.daemon import cgroup
from tests.conftest import DaemonProc, alive, wait_for

# --- the pure part: a layout and a tree of plain files ---------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 41 0:38 / /tmp/ro rw,relatime - cgroup2 cgroup2 ro
"""
HYBRID_CGROUP = """\
9:name=systemd:/system.slice/agentd.service
8:pids:/system.slice/agentd.service
4:memory:/system.slice/agentd.service
2:cpu,cpuacct:/system.slice/agentd.service
0::/system.slice/agentd.service
"""
V2_MOUNTINFO = (
    "25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)


def test_layouts_are_read_from_mountinfo_and_proc_cgroup() -> None:
    hybrid = cgroup.detect(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    assert hybrid.kind == "hybrid"
    assert hybrid.v2 is not None and hybrid.v2.mount == "/sys/fs/cgroup/unified"  # not the ro one
    assert hybrid.v2.own == "/sys/fs/cgroup/unified/system.slice/agentd.service"
    assert hybrid.v1["memory"].own == "/sys/fs/cgroup/memory/system.slice/agentd.service"
    assert hybrid.v1["cpu"] is hybrid.v1["cpuacct"]  # co-mounted: one hierarchy
    assert "systemd" not in hybrid.v1 and "name=systemd" not in hybrid.v1
    pure = cgroup.detect(V2_MOUNTINFO, "0::/user.slice/session-1.scope\n")
    assert pure.kind == "v2" and pure.v1 == {}
    assert pure.v2 is not None and pure.v2.own == "/sys/fs/cgroup/user.slice/session-1.scope"
    # A container that sees a bind mount of its own part of the hierarchy.
    bound = cgroup.detect(
        "30 20 0:22 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/docker/abc/x\n"
    )
    assert bound.v2 is not None and bound.v2.own == "/sys/fs/cgroup/x"
    assert cgroup.detect("", "").kind == "none"


def test_where_the_subtree_goes() -> None:
    unit = cgroup.Hierarchy(2, "/sys/fs/cgroup", "/sys/fs/cgroup/system.slice/agentd.service")
    tag = "agentd-123"
    delegated = cgroup.place(unit, tag, is_delegated=lambda path: path == unit.own)
    assert delegated == cgroup.Place(unit.own, unit.own + "/daemon", False, "delegated")
    subgroup = cgroup.Hierarchy(2, "/sys/fs/cgroup", unit.own + "/daemon")  # DelegateSubgroup=
    assert cgroup.place(subgroup, tag, is_delegated=lambda path: path == unit.own).leaf is None
    elsewhere = cgroup.place(unit, tag, is_delegated=lambda path: False)
    assert elsewhere == cgroup.Place("/sys/fs/cgroup/agentd-123", None, True, "created")
    assert cgroup.place(unit, tag, root="/x/y").base == "/x/y/agentd-123"
    legacy = cgroup.Hierarchy(1, "/sys/fs/cgroup/pids", "/sys/fs/cgroup/pids/user.slice")
    assert cgroup.place(legacy, tag).base == "/sys/fs/cgroup/pids/user.slice/agentd-123"
    assert cgroup.tag_for("/run/agentd") == cgroup.tag_for("/run/agentd/")


def fake_hierarchy(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    root = tmp_path / name
    root.mkdir()
    for file, text in files.items():
        (root / file).write_text(text)
    return root


def test_limits_and_counters_on_a_fake_pure_v2_tree(tmp_path: Path) -> None:
    v2 = fake_hierarchy(tmp_path, "v2", {})
    base = fake_hierarchy(  # as the kernel makes it: the parent enabled these for it
        v2, "agentd-t", {"cgroup.controllers": "cpuset cpu io memory pids\n"}
    )
    (base / "cgroup.subtree_control").write_text("")
    layout = cgroup.Layout(cgroup.Hierarchy(2, str(v2), str(v2)))
    tree = cgroup.open_subtree(layout, "agentd-t", is_delegated=lambda path: False)
    assert tree.main == str(base) and tree.how == "created" and tree.created == [str(base)]
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert tree.controllers == {"cpu": "v2", "memory": "v2", "pids": "v2"}
    group = tree.plan("w@1", 3, pids=32, cpu_percent=20)
    main = base / "w@1.3"
    assert group.main == str(main) and group.procs_files() == [str(main / "cgroup.procs")]
    assert group.limit_writes(memory_mb=200, pids=32, cpu_percent=20) == [
        (f"{main}/memory.max", str(200 * 1024 * 1024), True),
        (f"{main}/memory.swap.max", "0", False),  # RAM and swap: no swapping past it
        (f"{main}/memory.oom.group", "1", False),  # an OOM kills the whole group
        (f"{main}/pids.max", "32", True),
        (f"{main}/cpu.max", "20000 100000", True),
    ]
    main.mkdir()
    for name, text in {
        "memory.events": "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n",
        "memory.current": "300\n",
        "memory.stat": "anon 200\nfile 100\n",
        "memory.peak": "4096\n",
        "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n",
        "cgroup.events": "populated 1\nfrozen 0\n",
        "cgroup.kill": "",
        "cgroup.freeze": "",
    }.items():
        (main / name).write_text(text)
    assert group.oom_kills() == 1 and group.memory() == 200 and group.memory_peak() == 4096
    assert group.cpu_seconds() == 2.5 and group.populated() and not group.frozen()
    group.kill()
    group.freeze(True)
    assert (main / "cgroup.kill").read_text() == "1"
    assert (main / "cgroup.freeze").read_text() == "1"
    assert group.oom_eventfd() is None  # v2: memory.oom.group and memory.events instead
    assert group.line() == str(main)


def test_limits_on_a_fake_hybrid_tree(tmp_path: Path) -> None:
    v2 = fake_hierarchy(tmp_path, "unified", {})
    v1 = {
        c: cgroup.Hierarchy(1, str(p), str(p), frozenset({c}))
        for c in ("memory", "pids", "cpu")
        for p in [fake_hierarchy(tmp_path, c, {})]
    }
    layout = cgroup.Layout(cgroup.Hierarchy(2, str(v2), str(v2)), v1)
    assert layout.kind == "hybrid"
    tree = cgroup.open_subtree(layout, "agentd-t", is_delegated=lambda path: False)
    assert tree.controllers == {"cpu": "v1", "memory": "v1", "pids": "v1"}
    assert len(tree.created) == 4  # the cgroup2 base and one per v1 hierarchy
    small = tree.plan("a", 0)  # no limits: cgroup2 only (a v1 join costs a grace period)
    assert small.procs_files() == [f"{v2}/agentd-t/a.0/cgroup.procs"]
    assert tree.plan("m", 0, memory_mb=64).procs_files() == [
        f"{v2}/agentd-t/m.0/cgroup.procs",
        f"{tmp_path}/memory/agentd-t/m.0/cgroup.procs",
    ]
    group = tree.plan("b", 0, memory_mb=64, pids=10, cpu_percent=150)
    assert len(group.procs_files()) == 4
    mem, pids, cpu = (f"{tmp_path}/{c}/agentd-t/b.0" for c in ("memory", "pids", "cpu"))
    limit = str(64 * 1024 * 1024)
    assert group.limit_writes(memory_mb=64, pids=10, cpu_percent=150) == [
        (f"{mem}/memory.limit_in_bytes", limit, True),
        (f"{mem}/memory.memsw.limit_in_bytes", limit, False),  # where swap is accounted
        (f"{pids}/pids.max", "10", True),
        (f"{cpu}/cpu.cfs_period_us", "100000", True),
        (f"{cpu}/cpu.cfs_quota_us", "150000", True),  # 1.5 CPUs
    ]
    os.makedirs(mem)
    Path(mem, "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    Path(mem, "memory.usage_in_bytes").write_text("1000\n")
    Path(mem, "memory.stat").write_text("cache 10\ntotal_cache 400\ntotal_rss 600\n")
    assert group.oom_kills() == 2 and group.memory() == 600


def test_a_leftover_of_the_same_name_is_replaced(tmp_path: Path) -> None:
    v2 = fake_hierarchy(tmp_path, "v2", {})
    layout = cgroup.Layout(cgroup.Hierarchy(2, str(v2), str(v2)))
    tree = cgroup.open_subtree(layout, "agentd-t", is_delegated=lambda path: False)
    (v2 / "agentd-t" / "a.0").mkdir()
    assert tree.group("a", 0).main == f"{v2}/agentd-t/a.0"  # killed, removed, made again
    (v2 / "agentd-t" / "b.0" / "sub").mkdir(parents=True)
    assert tree.clean_leftovers() == 0  # removed, and not counted: nothing ran in them
    assert not any((v2 / "agentd-t").iterdir())


# --- real daemons, real cgroups -------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or bool(os.environ.get("AGENTD_TEST_CGROUP")),
    reason="cgroups are root's here (and AGENTD_TEST_CGROUP runs the suite without them)",
)


def sleepers(*seconds: str) -> dict[str, list[int]]:
    """PIDs whose argv is exactly ["sleep", N], by N (scanning /proc)."""
    found: dict[str, list[int]] = {s: [] for s in seconds}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if len(argv) == 2 and argv[0].endswith(b"sleep") and argv[1].decode() in found:
            found[argv[1].decode()].append(int(entry))
    return found


def agent_cgroups(d: DaemonProc) -> list[str]:
    """Directories of agent cgroups under this daemon's cgroup2 (or v1 main) subtree."""
    subtree = d.events("daemon.isolation")[0]["subtree"]
    try:
        return [e.path for e in os.scandir(subtree) if e.is_dir() and e.name != "daemon"]
    except FileNotFoundError:
        return []


def v1_or_v2_dir(pid: int, controller: str) -> Path:
    """The directory of `pid`'s cgroup that holds `controller`'s files."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return Path(f"/sys/fs/cgroup/{controller}{path}")
    unified = Path("/sys/fs/cgroup/unified")
    root = unified if unified.is_dir() else Path("/sys/fs/cgroup")
    path = next(
        line[3:]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    return Path(f"{root}{path}")


ESCAPERS = """
[agents.a]
command = ["sh", "-c", "setsid sleep {s1} & exec sleep {s2}"]
start_seconds = 0.3
[agents.b]
command = ["sh", "-c", "(setsid sleep {s3} &); exec sleep {s4}"]
start_seconds = 0.3
"""


def escapers(tag: int) -> tuple[str, list[str]]:
    """Two agents whose children leave: setsid(), and a double-forked daemon."""
    numbers = [str(424200 + tag * 10 + i) for i in range(4)]
    s1, s2, s3, s4 = numbers
    return ESCAPERS.format(s1=s1, s2=s2, s3=s3, s4=s4), [s1, s3]


def wait_for_escapees(numbers: list[str]) -> list[int]:
    found = wait_for(
        lambda: (pids := sleepers(*numbers)) and all(pids.values()) and pids,
        10,
        f"the escaping children {numbers}",
    )
    return [p for ps in found.values() for p in ps]


@needs_root
def test_children_that_leave_the_group_die_with_stop_and_shutdown(daemon_factory) -> None:
    config, escaped = escapers(1)
    d = daemon_factory(config).start()
    assert d.events("daemon.isolation")[0]["mode"] == "cgroup"
    pids = wait_for_escapees(escaped)
    for pid in pids:  # out of the agent's process group, out of its session
        assert os.getpgid(pid) not in (d.pid("a"), d.pid("b"))
    assert d.ctl("stop", "a", "b").returncode == 0  # SIGKILLed by then; gone a moment later
    wait_for(lambda: not any(alive(p) for p in pids), 2, "ctl stop to take every child")
    wait_for(lambda: not agent_cgroups(d), 5, "the stopped agents' cgroups to be removed")
    assert d.ctl("start", "a", "b").returncode == 0
    pids = wait_for_escapees(escaped)
    mount = cgroup.detect().v2.mount  # type: ignore[union-attr]
    subtree = d.events("daemon.isolation")[0]["subtree"].removeprefix(mount)
    for pid in pids:  # in an agent's cgroup below the daemon's subtree: NAME.INCARNATION
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        line = next(x for x in lines if x.startswith("0::"))
        assert re.fullmatch(rf"0::{re.escape(subtree)}/[ab]\.1", line), line
    assert d.ctl("shutdown").returncode == 0
    assert d.wait(10) == 0
    wait_for(lambda: not any(alive(p) for p in pids), 2, "ctl shutdown to take every child")
    subtree = Path(d.events("daemon.isolation")[0]["subtree"])
    assert not subtree.exists(), "the daemon's cgroup subtree outlived it"


@needs_root
def test_children_that_leave_die_with_the_daemon_and_leftovers_go_at_start(
    daemon_factory,
) -> None:
    config, escaped = escapers(2)
    d = daemon_factory(config).start()
    pids = wait_for_escapees(escaped)
    subtree = Path(d.events("daemon.isolation")[0]["subtree"])
    assert d.popen is not None
    os.kill(d.popen.pid, signal.SIGKILL)  # the guard is left to do it
    d.wait(5)
    wait_for(lambda: not any(alive(p) for p in pids), 5, "the guard to kill every cgroup")
    wait_for(lambda: not subtree.exists(), 5, "the guard to remove the subtree")

    # A crash the guard does not outlive either: whatever left the agents stays behind in
    # their cgroups, until the next start of the same daemon kills it and cleans up.
    d = daemon_factory(config).start()
    pids = wait_for_escapees(escaped)
    assert d.popen is not None
    guard = next(
        p.pid
        for p in psutil.Process(d.popen.pid).children()
        if any(a.endswith("guard.py") for a in p.cmdline())
    )
    os.kill(guard, signal.SIGKILL)
    os.kill(d.popen.pid, signal.SIGKILL)
    d.wait(5)
    time.sleep(0.2)  # an observation: the death signal takes the agents, not their escapees
    assert all(alive(p) for p in pids) and subtree.exists()
    d = daemon_factory(config).start()
    assert d.events("daemon.isolation")[0]["leftovers_removed"] == 2
    wait_for(lambda: not any(alive(p) for p in pids), 2, "the leftovers to be killed")
    assert d.stop() == 0


ALLOCATOR = """
import time
chunks = []
print("allocating", time.time(), flush=True)
while True:
    chunks.append(b"\\x01" * (50 << 20))  # 50 MB, every page written
"""


@needs_root
def test_a_memory_limit_is_the_kernels(daemon_factory, tmp_path) -> None:
    script = tmp_path / "alloc.py"
    script.write_text(ALLOCATOR)
    d = daemon_factory(f"""
[agents.hog]
command = ["{sys.executable}", "{script}"]
start_seconds = 0
restart = "temporary"
limits = {{ memory_mb = 200 }}
""").start()
    exited = d.wait_event("agent.exited", "hog")
    memory = d.events("agent.memory", "hog")[0]
    log = (d.runtime_dir / "log" / "hog.log").read_text()
    started = float(re.search(r"allocating ([0-9.]+)", log).group(1))  # type: ignore[union-attr]
    stamp = exited["timestamp"].replace("Z", "+00:00")
    took = dt.datetime.fromisoformat(stamp).timestamp() - started
    assert exited["reason"] == "memory" and exited["signal"] == "SIGKILL"
    assert 0 <= took < 1.0, f"reported {took:.2f} s after the allocation began"
    assert memory["limit"] == 200 * 1024 * 1024
    assert 0 < memory["peak"] <= memory["limit"], memory  # the cgroup's own high-water mark
    assert d.stop() == 0


FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()  # parent and child both go on forking
    except OSError:
        time.sleep(0.01)
"""


@needs_root
def test_a_fork_bomb_stays_inside_its_pids_limit(daemon_factory, tmp_path) -> None:
    script = tmp_path / "bomb.py"
    script.write_text(FORK_BOMB)
    d = daemon_factory(f"""
[agents.bomb]
command = ["{sys.executable}", "{script}"]
start_seconds = 0.5
limits = {{ pids = 32 }}
""").start()
    pids_dir = v1_or_v2_dir(d.pid("bomb"), "pids")
    current = lambda: int((pids_dir / "pids.current").read_text())  # noqa: E731
    wait_for(lambda: current() >= 32, 10, "the bomb to fill its cgroup")
    refused = lambda: cgroup.keyed((pids_dir / "pids.events").read_text())["max"]  # noqa: E731
    wait_for(lambda: int(refused()) > 0, 5, "the kernel to refuse a fork")
    for _ in range(20):  # some samples while it goes on trying: never past the limit
        assert current() <= 32
    assert d.ctl_json("status")["agents"]  # the host, the daemon included, is fine
    members = cgroup.pids_below(str(pids_dir))
    assert 0 < len(members) <= 32
    assert d.ctl("stop", "bomb").returncode == 0  # stopped cleanly: cgroup.kill
    wait_for(lambda: not any(alive(p) for p in members), 2, "every fork to be gone")
    wait_for(lambda: not pids_dir.exists(), 5, "its cgroup to be removed")
    assert d.stop() == 0


@needs_root
def test_cpu_percent_is_a_quota(daemon_factory, tmp_path) -> None:
    d = daemon_factory(f"""
[agents.spin]
command = ["{sys.executable}", "-c", "while True: pass"]
start_seconds = 0.2
limits = {{ cpu_percent = 20 }}
""").start()
    d.ctl_json("status", "spin")  # the first reading marks the start
    started = time.monotonic()
    time.sleep(3.0)  # the measurement window itself
    row = d.ctl_json("status", "spin")["agents"][0]
    elapsed = time.monotonic() - started
    assert 13 <= row["cpu"] <= 27, f"{row['cpu']}% over {elapsed:.1f} s with a 20% quota"
    assert d.stop() == 0


PAUSABLE = """
import os, threading, time
from agentd.agents import Agent


class Counter(Agent):
    def setup(self):
        def count():
            n = 0
            while True:
                n += 1
                with open(os.environ["COUNTER"], "w") as f:
                    f.write(str(n))
                time.sleep(0.02)

        threading.Thread(target=count, daemon=True).start()
"""


@needs_root
@pytest.mark.parametrize("isolation", ["cgroup", "off"])
def test_a_paused_agent_makes_no_progress_and_is_not_hung(
    daemon_factory, tmp_path, isolation
) -> None:
    (tmp_path / "pausable.py").write_text(PAUSABLE)
    counter = tmp_path / "counter"
    d = daemon_factory(f"""
[daemon]
cgroup = "{"auto" if isolation == "cgroup" else "off"}"
[agents.c]
module = "pausable:Counter"
heartbeat = 1.0
env = {{ PYTHONPATH = "{tmp_path}", COUNTER = "{counter}" }}
""").start()
    assert d.events("daemon.isolation")[0]["mode"] == (
        "cgroup" if isolation == "cgroup" else "process_group"
    )
    pid = d.pid("c")

    def read() -> int:
        return int(counter.read_text() or 0)

    wait_for(lambda: counter.exists() and read() > 0, 10, "the counter")
    assert d.ctl("pause", "c").returncode == 0
    assert d.ctl_json("status", "c")["agents"][0]["state"] == "paused"
    frozen_at = read()
    time.sleep(1.6)  # silence past the heartbeat, on purpose
    assert read() == frozen_at, "a paused agent made progress"
    assert d.ctl("resume", "c").returncode == 0
    wait_for(lambda: read() > frozen_at, 5, "the counter to go on")
    time.sleep(1.2)  # past one more heartbeat: still the same process, never taken for hung
    row = d.ctl_json("status", "c")["agents"][0]
    assert row["state"] == "running" and row["pid"] == pid and row["restarts"] == 0
    assert not d.events("agent.hung") and not d.events("agent.exited", "c")
    assert d.ctl("resume", "c").returncode == 1  # not paused
    assert d.stop() == 0


@needs_root
def test_isolation_is_said_out_loud(daemon_factory, tmp_path) -> None:
    """auto without a usable tree falls back and says so; `required` refuses instead."""
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "cgroup2", "-o", "ro", "none", str(ro)], check=True)
    try:
        body = f'[daemon]\ncgroup_root = "{ro}"\n[agents.a]\ncommand = ["sleep", "60"]\n'
        d = daemon_factory(body + "limits = { pids = 5 }\n").start()
        line = d.events("daemon.isolation")[0]
        assert line["mode"] == "process_group" and line["level"] == "warning"
        assert "read-only" in line["reason"] and line["unenforced"] == ["pids"]
        status = d.ctl_json("status")
        assert status["isolation"]["mode"] == "process_group"
        assert d.stop() == 0

        required = daemon_factory(body.replace("[daemon]\n", '[daemon]\ncgroup = "required"\n'))
        required.start(wait_ready=False)
        assert required.wait(10) == 1
        refused = required.events("daemon.isolation")[0]
        assert "daemon.cgroup = required, but no writable cgroup tree" in refused["error"]
        assert "read-only" in refused["error"] and not required.events("agent.starting")
        check = subprocess.run(
            [sys.executable, "-m", "agentd.daemon.cli", "check", "--config", str(required.config)],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 1
        lines = required.config.read_text().splitlines()
        line = 1 + next(i for i, text in enumerate(lines) if text.startswith("cgroup ="))
        assert f"{required.config}:{line}: daemon.cgroup = required, but" in check.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    off = daemon_factory('[daemon]\ncgroup = "off"\n[agents.a]\ncommand = ["sleep", "60"]\n')
    check = subprocess.run(
        [sys.executable, "-m", "agentd.daemon.cli", "check", "--config", str(off.config)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert "isolation: process groups (daemon.cgroup = off" in check.stdout


@needs_root
@pytest.mark.parametrize("trampoline", ["helper", "setpriv"])
def test_the_trampoline_joins_the_cgroup_then_drops_privileges(monkeypatch, trampoline) -> None:
    """Both trampolines: the agent's first instruction already runs in its cgroup, as nobody."""
    import pwd

    from agentd.daemon import spawn
    from agentd.daemon.spec import AgentSpec

    if trampoline == "setpriv":
        monkeypatch.setattr(spawn, "_HAVE_HELPER", False)  # sh -c writes, setpriv drops
    tree = cgroup.open_subtree(cgroup.detect(), f"agentd-test-{os.getpid()}")
    group = tree.group("t", 0)
    argv = ("/bin/cat", "/proc/self/cgroup", "/proc/self/status")
    spec = AgentSpec(name="t", pool=None, argv=argv, bus_agent=False, user="nobody")
    popen = spawn.spawn(spec, 0, "ipc:///nowhere", group=group)
    try:
        out, _ = popen.communicate(timeout=10)
    finally:
        group.kill()
        wait_for(group.remove, 5, "the test cgroup to go")
        tree.close()
    text = out.decode()
    leaf = os.path.relpath(group.main, tree.main)
    cgroup_lines = [line for line in text.splitlines() if line.endswith(f"/{leaf}")]
    assert len(cgroup_lines) == len(group.all_dirs()), text  # cgroup2 and v1 memory on hybrid
    uid = next(line.split()[1] for line in text.splitlines() if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam("nobody").pw_uid
    assert not any(Path(d).exists() for d in tree.created)


SPAWNER = """
import subprocess
from agentd.agents import Agent


class Spawner(Agent):
    def setup(self):
        # Leaves the agent's session and process group: only the cgroup holds it.
        subprocess.Popen(["setsid", "sleep", "4248"])
"""


@needs_root
def test_a_forked_agent_is_in_its_own_cgroup_before_its_code_runs(daemon_factory, tmp_path) -> None:
    (tmp_path / "spawner.py").write_text(SPAWNER)
    d = daemon_factory(f"""
[agents.w]
module = "spawner:Spawner"
limits = {{ memory_mb = 300 }}
env = {{ PYTHONPATH = "{tmp_path}" }}
""").start()
    assert d.events("daemon.isolation")[0]["mode"] == "cgroup"
    pid = d.pid("w")
    assert d.ctl_json("status", "w")["agents"][0]["pid"] == pid
    mount = cgroup.detect().v2.mount  # type: ignore[union-attr]
    subtree = d.events("daemon.isolation")[0]["subtree"].removeprefix(mount)
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x[:3] == "0::")
    assert line == f"0::{subtree}/w.0", line  # forked from its template, then placed
    memory = v1_or_v2_dir(pid, "memory")
    limit = memory / ("memory.max" if (memory / "memory.max").exists() else "memory.limit_in_bytes")
    assert int(limit.read_text()) == 300 * 1024 * 1024
    [escaped] = wait_for_escapees(["4248"])
    assert os.getpgid(escaped) != pid
    assert d.ctl("stop", "w").returncode == 0
    wait_for(lambda: not alive(escaped), 2, "the setsid child to go with its cgroup")
