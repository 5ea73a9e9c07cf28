"""Shared helpers for the agentd benchmarks (bench/restart.py, bench/ctl.py).

- `Cleanup`: every process a benchmark starts is registered here and torn down
  (SIGTERM, then SIGKILL, to its process group and its descendants) in a
  `finally`, also on Ctrl-C or SIGTERM to the benchmark.
- `ChildScanner`: a fast, incremental scan of /proc for the direct children of
  one process whose argv equals a given list. It is what psutil's
  `Process.children()` does (ppid from /proc/PID/stat), but remembers the pids
  it has already classified, so one poll costs ~0.1 ms instead of ~2 ms and the
  detector can run every 0.2 ms.
- `launch_agentd`: `agentd run --log-format json`, with the JSON event lines
  read by a thread and stamped with `time.perf_counter()` on arrival.
- `bench_venv`: a private venv (bench/.venv-bench) with third-party supervisors.
- small statistics helpers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_DIR = BENCH_DIR / ".venv-bench"
SLEEP_ARGV = ["/bin/sleep", "100000"]
# Every supervisor we start gets this in its environment (and passes it on to
# its children), so the final leak check finds only our own sleep processes.
MARK_KEY = "AGENTD_BENCH_MARK"
MARK = f"{os.getpid()}-{time.time_ns()}"


# --- statistics --------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def iso_to_epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# --- process bookkeeping -----------------------------------------------------------


class Cleanup:
    """Registry of started processes; `close()` stops them all, whatever happened."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.tmpdirs: list[Path] = []
        self.seen_pids: set[int] = set()  # descendants observed along the way

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        env = dict(kw.pop("env", None) or os.environ)
        env[MARK_KEY] = MARK
        proc = subprocess.Popen(list(argv), start_new_session=True, env=env, **kw)
        self.procs.append(proc)
        return proc

    def tmpdir(self, prefix: str = "agentd-bench-") -> Path:
        # Short paths: ipc:// and unix socket paths are limited to ~107 bytes.
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.tmpdirs.append(path)
        return path

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
        """SIGTERM to the group, wait, SIGKILL to the group and any descendant left."""
        descendants: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        _, alive = psutil.wait_procs(descendants, timeout=3)
        for child in alive:
            with contextlib.suppress(psutil.Error, OSError):
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                child.kill()
        for proc_file in (proc.stdin, proc.stdout, proc.stderr):
            if proc_file is not None:
                with contextlib.suppress(OSError):
                    proc_file.close()

    def close(self) -> list[psutil.Process]:
        """Stop everything (newest first); returns our sleep processes still alive."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for pid in self.seen_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        leftovers = find_marked(SLEEP_ARGV)
        for p in leftovers:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for path in self.tmpdirs:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers


def find_marked(argv: Sequence[str]) -> list[psutil.Process]:
    """Live processes running `argv` that carry our environment mark (or are our descendants)."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["cmdline"] != list(argv) or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(MARK_KEY) == MARK or me in {a.pid for a in p.parents()}:
                found.append(p)
        except psutil.Error:
            continue
    return found


def install_sigterm_as_interrupt() -> None:
    """SIGTERM/SIGHUP to the benchmark unwind through `finally` like Ctrl-C."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# --- the detector ------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _ppid(pid: int) -> int | None:
    data = _read(f"/proc/{pid}/stat")
    if data is None:
        return None
    # pid (comm) state ppid ... ; comm may contain spaces and parentheses.
    try:
        return int(data[data.rindex(b")") + 2 :].split(None, 2)[1])
    except (ValueError, IndexError):
        return None


class ChildScanner:
    """Direct children of `parent` whose argv is `argv`, by scanning /proc.

    A pid whose ppid is not `parent` is remembered and skipped until it leaves
    /proc (a process never *becomes* a child of a running parent; only new pids
    can). Children of `parent` are re-read until they exec `argv` (after fork
    they still show the parent's argv); once matched, a pid is kept until it
    disappears or turns into a zombie.
    """

    def __init__(self, parent: int, argv: Sequence[str] = SLEEP_ARGV) -> None:
        self.parent = parent
        self.target = ("\0".join(argv) + "\0").encode()
        self.others: set[int] = set()
        self.kids: set[int] = set()
        self.matched: set[int] = set()

    def poll(self) -> set[int]:
        pids = {int(n) for n in os.listdir("/proc") if n.isdigit()}
        self.others &= pids
        self.kids &= pids
        self.matched &= pids
        for pid in pids - self.others - self.kids:
            if _ppid(pid) == self.parent:
                self.kids.add(pid)
            else:
                self.others.add(pid)
        for pid in self.kids - self.matched:
            if _read(f"/proc/{pid}/cmdline") == self.target:
                self.matched.add(pid)
        # a killed child is a zombie (empty cmdline) until reaped: not "running"
        for pid in list(self.matched):
            stat = _read(f"/proc/{pid}/stat")
            if stat is None or stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"Z":
                self.matched.discard(pid)
                self.kids.discard(pid)
                self.others.add(pid)
        return set(self.matched)

    def wait_new(
        self, exclude: Iterable[int], timeout: float, interval: float = 0.0002
    ) -> tuple[int | None, float]:
        """Poll until a matching child not in `exclude` exists: (pid, perf_counter)."""
        exclude = set(exclude)
        deadline = time.perf_counter() + timeout
        while True:
            new = self.poll() - exclude
            now = time.perf_counter()
            if new:
                return min(new), now
            if now > deadline:
                return None, now
            time.sleep(interval)

    def wait_count(self, n: int, timeout: float, interval: float = 0.001) -> float | None:
        """Poll until at least `n` matching children exist: perf_counter or None."""
        deadline = time.perf_counter() + timeout
        while True:
            found = len(self.poll())
            now = time.perf_counter()
            if found >= n:
                return now
            if now > deadline:
                return None
            time.sleep(interval)


# --- agentd ------------------------------------------------------------------------


def agentd_argv(pythonpath: Path | None = None) -> list[str]:
    if pythonpath is None:
        exe = shutil.which("agentd")
        if exe:
            return [exe]
    return [sys.executable, "-m", "agentd.daemon.cli"]


def export_agentd(rev: str, dest: Path) -> Path:
    """`git archive REV` of agentd into dest; returns a PYTHONPATH that imports it.

    The editable install maps agentd.daemon -> daemon/ etc. of the working tree,
    which may hold someone's half-finished edit; this runs a committed revision.
    """
    src = dest / "src"
    pkg = dest / "path" / "agentd"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "daemon", "bus", "agents"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for part in ("daemon", "bus", "agents"):
        (pkg / part).symlink_to(src / part)
    return dest / "path"


def write_agentd_config(
    path: Path,
    runtime_dir: Path,
    agents: dict[str, Sequence[str]],
    start_seconds: float = 0,
    max_restarts: int | None = None,
    max_seconds: int | None = None,
) -> Path:
    lines = ["[daemon]", f'runtime_dir = "{runtime_dir}"', ""]
    if max_restarts is not None or max_seconds is not None:
        lines.append("[supervisor]")
        if max_restarts is not None:
            lines.append(f"max_restarts = {max_restarts}")
        if max_seconds is not None:
            lines.append(f"max_seconds = {max_seconds}")
        lines.append("")
    for name, argv in agents.items():
        lines += [
            f"[agents.{name}]",
            "command = [" + ", ".join(json.dumps(a) for a in argv) + "]",
            f"start_seconds = {start_seconds}",
            'restart = "permanent"',
            "",
        ]
    path.write_text("\n".join(lines))
    return path


class Agentd:
    """A running `agentd run` with its JSON event lines collected by a thread."""

    def __init__(
        self,
        cleanup: Cleanup,
        config: Path,
        extra_args: Sequence[str] = (),
        pythonpath: Path | None = None,
    ) -> None:
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
            )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.t_launch = time.perf_counter()
        self.proc = cleanup.popen(
            [
                *agentd_argv(pythonpath),
                *("run", "--config", str(config), "--log-format", "json", *extra_args),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            now = time.perf_counter()
            try:
                record = json.loads(raw)
            except ValueError:
                record = {"event": "raw", "line": raw.decode(errors="replace").rstrip()}
            with self.cond:
                self.events.append((now, record))
                self.cond.notify_all()
        with self.cond:
            self.events.append((time.perf_counter(), {"event": "eof"}))
            self.cond.notify_all()

    def wait_event(self, event: str, timeout: float, start: int = 0) -> tuple[float, dict] | None:
        """First event named `event` at index >= start: (arrival perf_counter, record)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, rec in self.events[start:]:
                    if rec.get("event") == event:
                        return t, rec
                    if rec.get("event") == "eof":
                        return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def tail(self, n: int = 10) -> str:
        with self.cond:
            return "\n".join(json.dumps(r) for _, r in self.events[-n:])


def launch_agentd(cleanup: Cleanup, config: Path, pythonpath: Path | None = None) -> Agentd:
    return Agentd(cleanup, config, pythonpath=pythonpath)


# --- third-party supervisors -------------------------------------------------------


def bench_venv(packages: Sequence[str] = ("supervisor", "circus")) -> Path:
    """bin/ of a venv holding `packages` (created under bench/.venv-bench once)."""
    bin_dir = VENV_DIR / "bin"
    py = bin_dir / "python"
    probe = "import " + ", ".join("supervisor" if p == "supervisor" else p for p in packages)
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return bin_dir
    print(f"creating {VENV_DIR} with {' '.join(packages)} ...", file=sys.stderr, flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return bin_dir


def cpu_percent_over(pid: int, seconds: float) -> float:
    """CPU% (user+system, one core = 100) of `pid` alone over `seconds` of wall time."""
    p = psutil.Process(pid)
    c0, t0 = p.cpu_times(), time.perf_counter()
    time.sleep(seconds)
    c1, t1 = p.cpu_times(), time.perf_counter()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    return 100.0 * used / (t1 - t0)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1024 * 1024)


# --- CLI timing (bench/ctl.py) -----------------------------------------------------


def agentd_console_script() -> Path:
    """The `agentd` console script next to the running interpreter.

    Not `shutil.which("agentd")`: under pyenv that finds a bash shim in
    ~/.pyenv/shims, which adds ~70 ms of bash before Python even starts.
    """
    return Path(sys.executable).parent / "agentd"


def time_command(
    argv: Sequence[str],
    runs: int,
    warmup: int = 2,
    env: dict[str, str] | None = None,
    ok_codes: Iterable[int] = (0,),
) -> list[float]:
    """Wall time (ms) of `argv` as a whole process, stdout/stderr to pipes; warm-ups dropped."""
    ok = set(ok_codes)
    samples = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        done = subprocess.run(list(argv), capture_output=True, env=env)
        elapsed = (time.perf_counter() - t0) * 1000
        if done.returncode not in ok:
            raise RuntimeError(
                f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr.decode(errors='replace')}"
            )
        if i >= warmup:
            samples.append(elapsed)
    return samples


# --- anchors for bench/bus.py's durable rows ---------------------------------------


def ensure_debian(binaries: dict[str, str]) -> dict[str, str]:
    """Paths of `binaries` ({binary: Debian package}), apt-get installing those missing.

    A package's maintainer scripts may start its service (redis-server ships a
    unit): any such server process that appears during the install is stopped
    again, so the bench leaves the machine as it found it apart from the packages.
    """
    missing = {b: p for b, p in binaries.items() if not _which_sbin(b)}
    if missing:
        pkgs = sorted(set(missing.values()))
        print(f"installing {' '.join(pkgs)} (apt-get) ...", file=sys.stderr, flush=True)
        before = {p.pid for p in psutil.process_iter()}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *pkgs],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        _stop_started_services(before, set(missing))
    paths = {b: _which_sbin(b) for b in binaries}
    absent = [b for b, p in paths.items() if not p]
    if absent:
        raise RuntimeError(f"not found after apt-get install: {', '.join(absent)}")
    return {b: str(p) for b, p in paths.items()}


def _which_sbin(binary: str) -> str | None:
    """shutil.which, also in /usr/sbin (nats-server lives there; not on every user's PATH)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/local/sbin:/usr/sbin:/sbin")


def _stop_started_services(before: set[int], names: set[str]) -> None:
    """Stop servers named `names` that an install started (pids not in `before`)."""
    for p in psutil.process_iter(["name"]):
        if p.pid in before or p.info["name"] not in names:
            continue
        service = p.info["name"]
        if shutil.which("systemctl") and os.path.isdir("/run/systemd/system"):
            subprocess.run(["systemctl", "disable", "--now", service], capture_output=True)
        else:
            subprocess.run(["service", service, "stop"], capture_output=True)
        with contextlib.suppress(psutil.Error):
            p.kill()


def bench_python(modules: dict[str, str]) -> Path:
    """The python of bench/.venv-bench, pip installing `modules` ({PyPI name: import name}).

    The venv is outside git (a `.gitignore` of `*` inside it) and kept between runs.
    """
    py = VENV_DIR / "bin" / "python"
    probe = "import " + ", ".join(modules.values())
    ok = py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0
    if not ok:
        print(f"installing {' '.join(modules)} into {VENV_DIR} ...", file=sys.stderr, flush=True)
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV_DIR)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *modules], check=True)
    ignore = VENV_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return py


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
