"""Kernel-enforced isolation: a cgroup for every agent incarnation (SPEC §11).

Three layers, all of them plain file operations on the cgroup file systems:

- `Layout`: which hierarchies the host mounts and where the daemon sits in
  each, from /proc/self/mountinfo and /proc/self/cgroup. A pure v2 host has one
  cgroup2 hierarchy for everything. A hybrid host (systemd's "hybrid" mode) has
  a cgroup2 hierarchy at /sys/fs/cgroup/unified, which serves kill, freeze and
  `populated` (those need no controller), and v1 hierarchies for memory, pids
  and cpu. A legacy host has v1 only: kill is then a loop over cgroup.procs.
- `Subtree`: agentd's own part of the tree, one base directory per hierarchy it
  uses. Under systemd with `Delegate=yes` the cgroup2 base is the unit's own
  cgroup, and the daemon moves itself into the leaf `daemon/` first, because a
  cgroup2 cgroup that hands controllers to its children may hold no process of
  its own. Elsewhere (as root) agentd creates `agentd-<tag>` and removes it at
  the end; the tag is a hash of runtime_dir, so two daemons on one host never
  share a subtree and a restarted daemon finds what a crashed one left. v1 bases
  are always `agentd-<tag>` below the daemon's own v1 cgroup: v1 has no rule
  against processes in inner cgroups, and the daemon's own limits keep holding.
- `Group`: one agent incarnation, `NAME.INCARNATION` in each hierarchy it joins.
  The daemon makes it and writes its limits before the spawn; the exec
  trampoline (pdeathsig.c) writes its own PID into every `cgroup.procs` before
  the agent runs a single instruction of its own; the daemon kills it whole,
  freezes it, reads its counters, and removes it once it is empty.

Only the standard library is imported, on purpose: guard.py (run as `python -S`
next to this file) imports this module to kill the agents' cgroups once the
daemon is gone, so there is one kill mechanism, not two kept in step by hand.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

LEAF = "daemon"  # where the daemon moves itself inside a delegated cgroup
PERIOD_US = 100_000  # cpu quota period: cpu_percent = 20 is 20 ms of CPU per 100 ms
V1_USED = ("memory", "pids", "cpu", "cpuacct", "freezer")  # v1 controllers agentd can use
WANTED_V2 = ("memory", "pids", "cpu")  # controllers agentd enables below its cgroup2 base
LIMIT_CONTROLLER = {"memory_mb": "memory", "pids": "pids", "cpu_percent": "cpu"}


class Unavailable(Exception):
    """No cgroup tree agentd can use here; the message says what is missing."""


# --- plain file operations ---------------------------------------------------------


def read(path: str) -> str:
    """A control file's text, in os.read calls (no buffered file object: 3x cheaper)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def write(path: str, value: str) -> None:
    """One write(2), as the kernel's control files expect (no buffering, no truncation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def keyed(text: str) -> dict[str, str]:
    """A flat-keyed file (memory.events, cpu.stat, cgroup.events): {key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


# --- the layout: which hierarchy serves what -------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """One mounted hierarchy and the daemon's own cgroup in it."""

    version: int  # 2: cgroup2; 1: a v1 hierarchy
    mount: str  # its mount point
    own: str  # the directory of the daemon's own cgroup in it
    controllers: frozenset[str] = frozenset()  # v1: the controllers bound to it


@dataclass(frozen=True)
class Layout:
    """The hierarchies of this host that agentd can use."""

    v2: Hierarchy | None
    v1: dict[str, Hierarchy] = field(default_factory=dict)  # by controller

    @property
    def kind(self) -> str:
        """v2 (pure cgroup2), hybrid, v1 (legacy) or none."""
        limits_on_v1 = any(c in self.v1 for c in ("memory", "pids", "cpu"))
        if self.v2 is not None:
            return "hybrid" if limits_on_v1 else "v2"
        return "v1" if self.v1 else "none"


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if "\\" not in text:
        return text
    return text.encode().decode("unicode_escape")


def parse_mountinfo(text: str) -> list[tuple[str, str, str, frozenset[str]]]:
    """cgroup mounts as (root inside the hierarchy, mount point, fstype, options)."""
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(fields[5].split(",")) | frozenset(rest[2].split(","))
        out.append((_unescape(fields[3]), _unescape(fields[4]), rest[0], options))
    return out


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}, "" for the cgroup2 hierarchy."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        for name in names.split(",") if names else [""]:
            out[name] = path
    return out


def _inside(mount: str, root: str, path: str) -> str | None:
    """The directory of cgroup `path` under a mount of the hierarchy's `root` (None: not)."""
    root = root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None  # a bind mount of some other part of the hierarchy
    return os.path.normpath(mount + path[len(root) :]) if path != root else mount


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> Layout:
    """This host's layout (or the one the given texts describe: tests pass fake ones).

    Where a hierarchy is mounted twice, the first read-write mount counts (a
    read-only one only if there is no other: creating the subtree then says EROFS).
    """
    if mountinfo is None:
        mountinfo = read("/proc/self/mountinfo")
    if proc_cgroup is None:
        proc_cgroup = read("/proc/self/cgroup")
    own = parse_proc_cgroup(proc_cgroup)
    v2: Hierarchy | None = None
    v1: dict[str, Hierarchy] = {}
    mounts = parse_mountinfo(mountinfo)
    for root, point, fstype, options in sorted(mounts, key=lambda m: "ro" in m[3]):
        if fstype == "cgroup2":
            where = _inside(point, root, own.get("", "/"))
            if v2 is None and "" in own and where is not None:
                v2 = Hierarchy(2, point, where)
            continue
        bound = frozenset(c for c in options if c in V1_USED)
        if not bound or any(c in v1 for c in bound):
            continue
        path = next((own[c] for c in bound if c in own), None)
        where = _inside(point, root, path) if path is not None else None
        if where is not None:
            hierarchy = Hierarchy(1, point, where, bound)
            for controller in bound:
                v1[controller] = hierarchy
    return Layout(v2, v1)


def mount_of(path: str, mountinfo: str | None = None) -> tuple[str, str, frozenset[str]] | None:
    """(mount point, fstype, options) of the cgroup mount holding `path`, if any."""
    if mountinfo is None:
        mountinfo = read("/proc/self/mountinfo")
    best = None
    real = os.path.realpath(path)
    for _, point, fstype, options in parse_mountinfo(mountinfo):
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best[0])):
            best = (point, fstype, options)
    return best


def tag_for(runtime_dir: str) -> str:
    """`agentd-<hash of runtime_dir>`: one daemon's subtree, found again after a crash."""
    digest = hashlib.sha1(os.path.realpath(runtime_dir).encode()).hexdigest()[:12]
    return f"agentd-{digest}"


def delegated(path: str) -> bool:
    """systemd marks a cgroup it delegates (Delegate=yes) with trusted.delegate=1 (>= 251)."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Place:
    """Where agentd's cgroup2 (or v1 main) subtree goes: the decision, before any I/O."""

    base: str  # the base directory agentd's agent cgroups go into
    leaf: str | None  # the daemon moves itself here first (delegated: no internal processes)
    created: bool  # agentd makes `base` and removes it at the end
    how: str  # for the isolation line: "delegated", "created", "cgroup_root"


def place(
    main: Hierarchy,
    tag: str,
    root: str | None = None,
    is_delegated: Callable[[str], bool] = delegated,
) -> Place:
    """Choose the base of the main hierarchy (pure, but for the xattr question)."""
    if root is not None:
        return Place(os.path.join(root, tag), None, True, "cgroup_root")
    if main.version == 2:
        parent, name = os.path.split(main.own.rstrip("/"))
        if name == LEAF and is_delegated(parent):  # DelegateSubgroup=daemon (systemd >= 254)
            return Place(parent, None, False, "delegated")
        if is_delegated(main.own):
            return Place(main.own, os.path.join(main.own, LEAF), False, "delegated")
        return Place(os.path.join(main.mount, tag), None, True, "created")
    return Place(os.path.join(main.own, tag), None, True, "created")


# --- one agent's cgroup -----------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """One agent incarnation's cgroup: `main` kills and freezes; `dirs` by controller.

    On a pure v2 host every controller's directory is `main`; on a hybrid host the
    limits live in v1 directories of the same name in their own hierarchies.
    """

    main: str
    v2: bool  # main is a cgroup2 directory
    dirs: dict[str, str] = field(default_factory=dict)  # controller -> directory

    def on_v2(self, controller: str) -> bool:
        return self.v2 and self.dirs.get(controller) == self.main

    def all_dirs(self) -> list[str]:
        """main first, each directory once."""
        return list(dict.fromkeys([self.main, *self.dirs.values()]))

    def v1_dirs(self) -> list[str]:
        """The directories a new process must be moved into (a migration each): all but a
        cgroup2 main, which it can be born in (CLONE_INTO_CGROUP)."""
        dirs = self.all_dirs()
        return dirs[1:] if self.v2 else dirs

    def procs_files(self) -> list[str]:
        """What the trampoline writes its PID into, before the agent runs."""
        return [os.path.join(d, "cgroup.procs") for d in self.all_dirs()]

    def file(self, controller: str, name: str) -> str:
        return os.path.join(self.dirs[controller], name)

    # --- limits ---

    def limit_writes(
        self, memory_mb: int = 0, pids: int = 0, cpu_percent: int = 0
    ) -> list[tuple[str, str, bool]]:
        """(file, value, required) to write, in order, for these limits (0 = none). Pure.

        Memory is RAM and swap together, so a limited agent cannot swap its way past
        the limit (v2: memory.swap.max = 0; v1: memsw = the limit, where swap
        accounting exists), and on v2 an OOM kills the whole group (memory.oom.group).
        """
        out: list[tuple[str, str, bool]] = []
        if memory_mb and "memory" in self.dirs:
            limit = str(memory_mb * 1024 * 1024)
            if self.on_v2("memory"):
                out += [(self.file("memory", "memory.max"), limit, True)]
                out += [(self.file("memory", "memory.swap.max"), "0", False)]
                out += [(self.file("memory", "memory.oom.group"), "1", False)]
            else:
                out += [(self.file("memory", "memory.limit_in_bytes"), limit, True)]
                out += [(self.file("memory", "memory.memsw.limit_in_bytes"), limit, False)]
        if pids and "pids" in self.dirs:
            out += [(self.file("pids", "pids.max"), str(pids), True)]
        if cpu_percent and "cpu" in self.dirs:
            quota = str(cpu_percent * PERIOD_US // 100)
            if self.on_v2("cpu"):
                out += [(self.file("cpu", "cpu.max"), f"{quota} {PERIOD_US}", True)]
            else:
                out += [(self.file("cpu", "cpu.cfs_period_us"), str(PERIOD_US), True)]
                out += [(self.file("cpu", "cpu.cfs_quota_us"), quota, True)]
        return out

    def apply_limits(self, memory_mb: int = 0, pids: int = 0, cpu_percent: int = 0) -> None:
        for path, value, required in self.limit_writes(memory_mb, pids, cpu_percent):
            try:
                write(path, value)
            except OSError:
                if required:
                    raise

    # --- kill, freeze, populated ---

    def kill(self) -> None:
        kill(self.main)

    def populated(self) -> bool:
        return populated(self.main)

    @property
    def can_freeze(self) -> bool:
        return self.v2 or "freezer" in self.dirs

    def freeze(self, frozen: bool) -> None:
        if self.v2:
            write(os.path.join(self.main, "cgroup.freeze"), "1" if frozen else "0")
        else:
            write(self.file("freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")

    def frozen(self) -> bool:
        if self.v2:
            return keyed(read(os.path.join(self.main, "cgroup.events"))).get("frozen") == "1"
        return read(self.file("freezer", "freezer.state")).strip() == "FROZEN"

    # --- counters ---

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group so far."""
        if "memory" not in self.dirs:
            return 0
        name = "memory.events" if self.on_v2("memory") else "memory.oom_control"
        try:
            return int(keyed(read(self.file("memory", name))).get("oom_kill", "0"))
        except (OSError, ValueError):
            return 0

    def memory(self) -> int | None:
        """Resident memory of the whole group: usage minus page cache, in bytes."""
        if "memory" not in self.dirs:
            return None
        if self.on_v2("memory"):
            usage, cache_key = self.file("memory", "memory.current"), "file"
        else:
            usage, cache_key = self.file("memory", "memory.usage_in_bytes"), "total_cache"
        try:
            total = int(read(usage))
            cache = int(keyed(read(self.file("memory", "memory.stat"))).get(cache_key, "0"))
        except (OSError, ValueError):
            return None
        return max(0, total - cache)

    def memory_peak(self) -> int | None:
        """The group's own high-water mark (memory.peak, or v1 max_usage_in_bytes)."""
        if "memory" not in self.dirs:
            return None
        name = "memory.peak" if self.on_v2("memory") else "memory.max_usage_in_bytes"
        try:
            return int(read(self.file("memory", name)))
        except (OSError, ValueError):
            return None

    def cpu_seconds(self) -> float | None:
        """CPU time of the whole group so far (cpu.stat usage_usec; v1 cpuacct.usage)."""
        try:
            if self.v2:
                stat = keyed(read(os.path.join(self.main, "cpu.stat")))
                return int(stat["usage_usec"]) / 1e6
            if "cpuacct" in self.dirs:
                return int(read(self.file("cpuacct", "cpuacct.usage"))) / 1e9
        except (OSError, KeyError, ValueError):
            pass
        return None

    def oom_eventfd(self) -> int | None:
        """v1: an eventfd the kernel signals on OOM (cgroup.event_control); v2 needs none.

        On v2 memory.oom.group kills the whole group, the agent with it, so its
        exit is seen (SIGCHLD) and memory.events says why; v1 kills one process, maybe a child.
        """
        if "memory" not in self.dirs or self.on_v2("memory"):
            return None
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            cfd = os.open(self.file("memory", "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                write(self.file("memory", "cgroup.event_control"), f"{efd} {cfd}")
            finally:
                os.close(cfd)
        except OSError:
            os.close(efd)
            return None
        return efd

    # --- removal ---

    def remove(self) -> bool:
        """rmdir every directory of the group; False while something still runs in it."""
        return all(remove_tree(d) for d in self.all_dirs())

    def line(self) -> str:
        """The group as the guard is told it: its directories, tab-separated, main first."""
        return "\t".join(self.all_dirs())


def kill(main: str) -> None:
    """SIGKILL everything in the cgroup at `main` and below it.

    cgroup2 has cgroup.kill (Linux 5.14): one write, and even a process forking
    at that moment cannot escape. Without it (v1, older kernels) each PID listed
    in cgroup.procs is killed until none is left that was not already signalled.
    """
    try:
        write(os.path.join(main, "cgroup.kill"), "1")
        return
    except FileNotFoundError:
        if not os.path.isdir(main):
            return
    if os.path.ismount(main):
        raise ValueError(f"refusing to kill every process in the hierarchy at {main}")
    signalled: set[int] = set()
    for _ in range(1000):  # pids.max bounds a fork bomb; this bounds us
        fresh = set(pids_below(main)) - signalled
        if not fresh:
            return
        for pid in fresh:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        signalled |= fresh


def pids_below(main: str) -> list[int]:
    """Every PID in the cgroup and its descendants (cgroup.procs of each)."""
    out: list[int] = []
    for dirpath, _, _ in os.walk(main):
        try:
            out += [int(p) for p in read(os.path.join(dirpath, "cgroup.procs")).split()]
        except (OSError, ValueError):
            continue
    return out


def populated(main: str) -> bool:
    """Does anything still run in the cgroup or below it?"""
    try:
        events = read(os.path.join(main, "cgroup.events"))
    except FileNotFoundError:
        return bool(pids_below(main))  # v1: no cgroup.events
    except OSError:
        return False
    return keyed(events).get("populated") == "1"


def remove_tree(path: str) -> bool:
    """rmdir `path` and any cgroups below it (deepest first); True once it is gone.

    One rmdir in the usual case; only a cgroup that has cgroups below it (an agent
    that made its own) or processes in it (EBUSY) is looked into.
    """
    if _rmdir(path):
        return True
    try:
        with os.scandir(path) as entries:
            subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not subdirs or not all([remove_tree(d) for d in subdirs]):
        return False
    return _rmdir(path)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def kill_and_remove(groups: Iterable[list[str]], bases: Iterable[str], wait: float) -> None:
    """The guard's last act: kill every group (main first in each), remove what empties."""
    groups = [g for g in groups if g]
    for dirs in groups:
        try:
            kill(dirs[0])
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + wait
    pending = groups
    while pending:
        pending = [g for g in pending if not all(_quietly(remove_tree, d) for d in g)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    for base in bases:
        _quietly(os.rmdir, base)


def _quietly(function: Callable[[str], object], path: str) -> bool:
    try:
        return function(path) is not False
    except OSError:
        return False


# --- agentd's subtree -------------------------------------------------------------


@dataclass
class Subtree:
    """agentd's part of the cgroup tree, made (or taken over) when the daemon starts."""

    layout: Layout
    main: str  # base directory in the hierarchy that kills and freezes
    v2: bool
    bases: dict[str, str]  # controller -> base directory (== main where cgroup2 serves it)
    how: str  # delegated | created | cgroup_root
    created: list[str] = field(default_factory=list)  # bases agentd made, removed at close
    leaf: str | None = None  # where the daemon runs (delegated)

    @property
    def controllers(self) -> dict[str, str]:
        """controller -> "v2" | "v1", for the isolation line and status."""
        return {
            c: "v2" if self.v2 and base == self.main else "v1"
            for c, base in sorted(self.bases.items())
        }

    def plan(
        self, name: str, incarnation: int, memory_mb: int = 0, pids: int = 0, cpu_percent: int = 0
    ) -> Group:
        """The cgroup of one incarnation, `NAME.INCARNATION` in each hierarchy (no I/O).

        A v1 hierarchy is joined only when it is needed: each join is a task
        migration, and the first in a while waits out an RCU grace period (~10 ms on
        the agent's way to READY), while a cgroup2 directory costs nothing to be born
        in (CLONE_INTO_CGROUP). So memory is joined on v2 always (status reads the
        group's RSS there), on v1 only for a memory limit (status reads /proc
        instead); pids and cpu only for their limits; on a v1-only host cpuacct (CPU
        time) and freezer (pause). The suffix keeps names apart from v1's control
        files (`tasks`).
        """
        wanted = set()
        if memory_mb or not self.v2 or self.bases.get("memory") == self.main:
            wanted.add("memory")
        if pids:
            wanted.add("pids")
        if cpu_percent:
            wanted.add("cpu")
        if not self.v2:
            wanted |= {"cpuacct", "freezer"}
        leaf = f"{name}.{incarnation}"
        main = os.path.join(self.main, leaf)
        dirs = {c: os.path.join(self.bases[c], leaf) for c in wanted if c in self.bases}
        return Group(main, self.v2, dirs)

    def group(
        self, name: str, incarnation: int, memory_mb: int = 0, pids: int = 0, cpu_percent: int = 0
    ) -> Group:
        """Make the cgroup of one incarnation, limits written; OSError if the kernel refuses."""
        group = self.plan(name, incarnation, memory_mb, pids, cpu_percent)
        made: list[str] = []
        try:
            for path in group.all_dirs():
                _fresh_dir(path)
                made.append(path)
            group.apply_limits(memory_mb, pids, cpu_percent)
        except OSError:
            for path in made:
                _quietly(remove_tree, path)
            raise
        return group

    def clean_leftovers(self) -> int:
        """Kill and remove what a crashed daemon left in our bases; how many agent
        cgroups still had processes in them (empty ones are removed too)."""
        found = 0
        for base in dict.fromkeys([self.main, *self.bases.values()]):  # main first: it kills
            try:
                children = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            # Not the daemon's leaf, nor systemd's own (.control, for ExecReload= and the
            # like): agent cgroups are NAME.N, and a name starts with a letter.
            children = [e for e in children if e.name[:1].isalpha() and e.name != LEAF]
            if base == self.main:
                found = sum(populated(e.path) for e in children)
            if children:
                kill_and_remove([[e.path] for e in children], (), wait=2.0)
        return found

    def close(self) -> None:
        """The daemon's end: remove the bases it made (its agents' groups are gone)."""
        for base in reversed(self.created):
            _quietly(remove_tree, base)

    def guard_lines(self) -> list[str]:
        """Bases the guard removes after its kills (only those agentd made)."""
        return list(self.created)


def _fresh_dir(path: str) -> None:
    """mkdir; a directory of that name left by an earlier run is killed and replaced."""
    try:
        os.mkdir(path)
        return
    except FileExistsError:
        pass
    kill_and_remove([[path]], (), wait=1.0)
    os.mkdir(path)


def open_subtree(
    layout: Layout,
    tag: str,
    root: str | None = None,
    mountinfo: str | None = None,
    is_delegated: Callable[[str], bool] = delegated,
) -> Subtree:
    """Make (or take over) agentd's subtree; Unavailable says why there is none.

    Moves the daemon into the leaf first when the cgroup2 base is delegated (the
    threads of the process move with it: cgroup.procs takes the whole process).
    """
    main_h = main_hierarchy(layout, root, mountinfo)
    where = place(main_h, tag, root, is_delegated)
    created: list[str] = []
    try:
        if where.created:
            os.makedirs(where.base, exist_ok=True)  # it may be ours from a crashed run
            created.append(where.base)
        if where.leaf is not None:
            os.makedirs(where.leaf, exist_ok=True)
            write(os.path.join(where.leaf, "cgroup.procs"), str(os.getpid()))
    except OSError as exc:
        raise Unavailable(f"cannot use {where.base}: {exc.strerror or exc}") from None
    v2 = main_h.version == 2
    bases: dict[str, str] = {}
    if v2:
        bases.update({c: where.base for c in _enable_v2(where.base)})
    elif main_h.controllers:
        bases.update({c: where.base for c in main_h.controllers})
    for controller, hierarchy in layout.v1.items():
        if controller in bases or (v2 and controller == "freezer"):
            continue
        if v2 and controller == "cpuacct":
            continue  # cgroup2's cpu.stat has the CPU time
        base = os.path.join(hierarchy.own, tag)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue  # that controller is simply not used
        bases[controller] = base
        if base not in created:
            created.append(base)
    return Subtree(layout, where.base, v2, bases, where.how, created, where.leaf)


def main_hierarchy(layout: Layout, root: str | None, mountinfo: str | None = None) -> Hierarchy:
    """The hierarchy that kills, freezes and says `populated`: cgroup2, else a v1 one.

    With `cgroup_root`, the hierarchy that directory is in. Unavailable if none.
    """
    if root is not None:
        mounted = mount_of(root, mountinfo)
        if mounted is None:
            raise Unavailable(f"cgroup_root {root} is not in a cgroup file system")
        if "ro" in mounted[2]:
            raise Unavailable(f"cgroup_root {root} is read-only ({mounted[0]} is mounted ro)")
        return Hierarchy(2 if mounted[1] == "cgroup2" else 1, mounted[0], root)
    main = layout.v2
    if main is None:
        main = next((layout.v1[c] for c in ("pids", "memory", "freezer") if c in layout.v1), None)
    if main is None:
        raise Unavailable("no cgroup hierarchy is mounted (see /proc/self/mountinfo)")
    return main


def _enable_v2(base: str) -> list[str]:
    """Hand memory, pids and cpu to the agents' cgroups where the parent offers them."""
    try:
        offered = read(os.path.join(base, "cgroup.controllers")).split()
    except OSError:
        return []
    wanted = [c for c in WANTED_V2 if c in offered]
    if not wanted:
        return []
    try:
        current = read(os.path.join(base, "cgroup.subtree_control")).split()
        missing = [c for c in wanted if c not in current]
        if missing:
            write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in missing))
    except OSError:
        return []  # processes in `base` itself (no internal processes): no controllers
    return wanted


# --- what the daemon says about it ---------------------------------------------


def probe(mode: str, root: str | None, tag: str) -> tuple[str, str]:
    """For `agentd check`, touching nothing: ("cgroup" | "process_group", what/why).

    The same decisions as open_subtree, with access(2) in place of mkdir.
    """
    if mode == "off":
        return "process_group", "daemon.cgroup = off"
    try:
        layout = detect()
        main_h = main_hierarchy(layout, root)
    except OSError as exc:
        return "process_group", f"cannot read /proc/self: {exc}"
    except Unavailable as exc:
        return "process_group", f"no writable cgroup tree: {exc}"
    where = place(main_h, tag, root)
    parent = where.base if not where.created else os.path.dirname(where.base)
    if not os.access(parent, os.W_OK):
        return "process_group", f"no writable cgroup tree: {parent} is not writable"
    return "cgroup", f"{layout.kind} layout, {where.how} subtree {where.base}"
