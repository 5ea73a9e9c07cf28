"""TOML configuration: lookup, includes, validation, FILE:LINE errors.

The flow is: read files (main + `include` drop-ins) → convert each table into
a loose msgspec shape (unknown keys and wrong types are caught here) → check
the cross-references (children, cycles, duplicates) → build the frozen
`Spec`. Every problem becomes a `ConfigIssue` carrying the file and, where
the TOML text gives one, the line, so `agentd check` can print
`FILE:LINE: message` and a reload can refuse without touching anything.
"""

from __future__ import annotations

import glob
import grp
import math
import os
import pwd
import re
import signal
import stat
import sys
import tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from ..bus.endpoint import parse_endpoint
from ..bus.patterns import valid as patterns_valid
from .locate import (
    BUS_DEFAULT,
    CONTROL_DEFAULT,
    ConfigError,
    ConfigIssue,
    find_config,
    locate_daemon,
    log_dir_default,
    state_dir_default,
)
from .spawn import find_program
from .spec import (
    RESERVED_NAMES,
    ROOT,
    AgentSpec,
    AutoShutdown,
    CgroupMode,
    DaemonSpec,
    JournalSync,
    Limits,
    PoolSpec,
    RestartType,
    Spec,
    StartMode,
    Strategy,
    SupervisorSpec,
    pool_member,
)

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
MODULE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# --- loose shapes: what a file may say -------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


def _defaults(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """A spec struct's defaults by field: spec.py writes each default once, for both."""
    fields = msgspec.structs.fields(struct)
    return {f.name: f.default for f in fields if f.default is not msgspec.NODEFAULT}


_DAEMON, _SUPERVISOR, _AGENT = (_defaults(s) for s in (DaemonSpec, SupervisorSpec, AgentSpec))


class DaemonConfig(_Strict):
    runtime_dir: str | None = None
    log_dir: str | None = None
    state_dir: str | None = None
    journal_sync: JournalSync = _DAEMON["journal_sync"]
    control: str = CONTROL_DEFAULT
    bus: str = BUS_DEFAULT
    shutdown_timeout: float = _DAEMON["shutdown_timeout"]
    log_max_bytes: int = _DAEMON["log_max_bytes"]
    log_backups: int = _DAEMON["log_backups"]
    memory_check_interval: float = _DAEMON["memory_check_interval"]
    keys_dir: str | None = None
    max_frame: int = _DAEMON["max_frame"]
    death_signal: bool = _DAEMON["death_signal"]
    metrics: str | None = None
    metrics_tls_cert: str | None = None
    metrics_tls_key: str | None = None
    event_history: int = _DAEMON["event_history"]
    cgroup: CgroupMode = _DAEMON["cgroup"]
    cgroup_root: str | None = None


class SupervisorConfig(_Strict):
    strategy: Strategy = _SUPERVISOR["strategy"]
    max_restarts: int = _SUPERVISOR["max_restarts"]
    max_seconds: float = _SUPERVISOR["max_seconds"]
    restart: RestartType = _SUPERVISOR["restart"]
    children: list[str] | None = None  # None in [supervisor]: every agent no one lists
    auto_shutdown: AutoShutdown = _SUPERVISOR["auto_shutdown"]
    significant: bool = _SUPERVISOR["significant"]
    # A supervisor's stop waits for each child's own escalation: OTP's `infinity`, the
    # one value that fits a supervisor child, accepted so a config can say so.
    shutdown: Literal["infinity"] = "infinity"
    template: str | None = None  # strategy = "dynamic" only: the agent children are made from
    max_children: int = _SUPERVISOR["max_children"]


class AgentConfig(_Strict):
    module: str | None = None
    command: list[str] | None = None
    start: StartMode | None = None  # None: fork for a module agent, exec for a command
    restart: RestartType = _AGENT["restart"]
    shutdown: float | Literal["brutal_kill", "infinity"] = _AGENT["shutdown"]
    stop_signal: str = signal.Signals(_AGENT["stop_signal"]).name
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    subscribe: list[str] = []
    heartbeat: float = _AGENT["heartbeat"]
    start_seconds: float = _AGENT["start_seconds"]
    replicas: int | None = None
    ack: bool = _AGENT["ack"]
    restart_delay: float = _AGENT["restart_delay"]
    significant: bool = _AGENT["significant"]
    memory_ksm: bool = _AGENT["memory_ksm"]
    redirect_stderr: bool = _AGENT["redirect_stderr"]
    limits: Limits = _AGENT["limits"]
    max_deliveries: int = _AGENT["max_deliveries"]
    retry_backoff: float = _AGENT["retry_backoff"]
    max_in_flight: int = _AGENT["max_in_flight"]
    max_pending: int = _AGENT["max_pending"]


# --- bounds: every count and size the config accepts --------------------------


@dataclass(frozen=True)
class Bound:
    """An inclusive range for one key; `above` makes the low end exclusive (> low)."""

    low: float
    high: float
    unit: str = ""
    above: bool = False  # 0 (the low end) makes no sense: the value must be more

    def holds(self, value: float) -> bool:
        """In range (NaN never is: every comparison with it is false)."""
        low_ok = value > self.low if self.above else value >= self.low
        return low_ok and value <= self.high

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.above:
            return f"must be > {_num(self.low)} and <= {_num(self.high)}{unit}"
        return f"must be between {_num(self.low)} and {_num(self.high)}{unit}"


_HOUR, _DAY = 3600, 86_400

#: SPEC §11 "Bounds": each count and size in one table. The upper ends are far past any
#: real deployment; they are there so a slip of the keyboard (three zeros too many) is a
#: FILE:LINE error from `check`, answered at once, and not an attempt: `replicas =
#: 100000000` used to build 10^8 members (11 GB, past 60 s). Counts are checked before
#: anything is expanded. Keys: "daemon.K", "supervisor.K" ([supervisor] and every
#: [supervisors.*]), "agent.K" and "agent.limits.K"; "tree.K" bound the tree as a whole.
BOUNDS: dict[str, Bound] = {
    # [daemon]
    "daemon.shutdown_timeout": Bound(0, _DAY, "seconds"),  # the whole tree's stop; 0 = at once
    "daemon.log_max_bytes": Bound(1024, 2**40, "bytes"),  # one log file until rotation: 1 TiB
    "daemon.log_backups": Bound(0, 1000),  # rotated files kept per agent
    "daemon.memory_check_interval": Bound(0.05, _HOUR, "seconds"),  # RSS sampling period
    # The broker refuses a larger signal; it also allocates max_frame bytes to probe a full
    # disk, and lets ZeroMQ take 16 x max_frame before it drops a peer: 256 MiB → 4 GiB.
    "daemon.max_frame": Bound(1024, 256 * 2**20, "bytes"),
    # Events kept in memory for `ctl events --since` (each a few hundred bytes).
    "daemon.event_history": Bound(1, 1_000_000),
    # [supervisor], [supervisors.*]: restart intensity
    "supervisor.max_restarts": Bound(0, 10_000),  # more restarts than this within ...
    "supervisor.max_seconds": Bound(0, _DAY, "seconds", above=True),  # ... this: it gives up
    # strategy = "dynamic": children spawned at run time, at most (default 1000; SPEC §12)
    "supervisor.max_children": Bound(1, 100_000),
    # [agents.*]
    "agent.replicas": Bound(0, 100_000),  # pool members (SPEC §11); 0 = a pool scaled to none
    "agent.shutdown": Bound(0, _DAY, "seconds"),  # stop_signal → SIGKILL ("brutal_kill": none)
    "agent.heartbeat": Bound(0, _DAY, "seconds", above=True),  # bus silence → hung
    "agent.start_seconds": Bound(0, _HOUR, "seconds"),  # up this long = started (not on the bus)
    "agent.restart_delay": Bound(0, _HOUR, "seconds"),  # pause before a restart
    # Durable delivery (SPEC §10); the broker's retry doubling stops at 30 s too.
    "agent.max_deliveries": Bound(1, 1000),  # failed deliveries → dead-letter queue
    "agent.retry_backoff": Bound(0, 30, "seconds", above=True),  # first retry's wait
    "agent.max_in_flight": Bound(1, 100_000),  # handed to the agent, not yet acknowledged
    "agent.max_pending": Bound(1, 10_000_000),  # kept by the broker for one agent
    # limits = {...}; 0 = unlimited
    "agent.limits.memory_mb": Bound(0, 16 * 2**20, "MiB"),  # 16 TiB
    "agent.limits.nofile": Bound(0, 2**20),  # Linux's default fs.nr_open: setrlimit refuses more
    "agent.limits.cpu_seconds": Bound(0, 365 * _DAY, "seconds"),  # RLIMIT_CPU: a year of CPU
    "agent.limits.pids": Bound(0, 4 * 2**20),  # pids.max: Linux's PID_MAX_LIMIT (4 Mi)
    "agent.limits.cpu_percent": Bound(0, 1024 * 100, "% of one CPU"),  # a quota of 1024 CPUs
    # The tree as a whole (a pool counts once per member).
    "tree.instances": Bound(0, 100_000),  # agent instances in all, across pools and files
    "tree.supervisors": Bound(0, 10_000),  # supervisors, the root included
    "tree.children": Bound(0, 100_000),  # per supervisor: a full-size pool must fit
    "tree.depth": Bound(0, 32),  # supervisors nested below root (tree.py recurses per level)
    # ZeroMQ routing ids are at most 255 bytes; "NAME@99999" and "NAME.log.1000" must fit.
    "tree.name_length": Bound(0, 128),
}

MAX_REPLICAS = int(BOUNDS["agent.replicas"].high)  # for `ctl scale`, which must agree


def _num(value: float) -> str:
    """A number as a user would type it back (no 1e+05 for an int, no 30.0 for 30)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    if isinstance(value, int):
        digits = str(value)
        return digits if len(digits) <= 15 else f"a {len(digits)}-digit number"
    return f"{value:g}"


# --- locating keys in the TOML text ------------------------------------------

_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")
_INLINE_KEY_RE = re.compile(r"[{,]\s*([A-Za-z0-9_\-\"']+)\s*=")


_KEY_PART_RE = re.compile(r'\s*("[^"]*"|\'[^\']*\'|[^.]+)\s*(?:\.|$)')


def _split_key(key: str) -> list[str]:
    """Split a dotted TOML key, keeping quoted parts ("a.b") whole."""
    return [part.strip("\"'") for part in _KEY_PART_RE.findall(key.strip())]


class LineIndex:
    """Maps dotted key paths ("agents.web.restart") to the line that sets them.

    tomllib gives values but no positions; a light scan of the text is enough
    to point a user at the right line for nearly every mistake.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str, ...], int] = {}
        table: list[str] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            header = _HEADER_RE.match(raw)
            if header:
                table = _split_key(header.group(1))
                self.lines.setdefault(tuple(table), number)
                continue
            key = _KEY_RE.match(raw)
            if not key:
                continue
            path = (*table, *_split_key(key.group(1)))
            self.lines.setdefault(path, number)
            for inner in _INLINE_KEY_RE.finditer(raw):
                self.lines.setdefault((*path, inner.group(1).strip("\"'")), number)

    def line(self, *path: str) -> int | None:
        """The line of the longest known prefix of `path`."""
        for end in range(len(path), 0, -1):
            found = self.lines.get(tuple(path[:end]))
            if found is not None:
                return found
        return None


# --- reading files ----------------------------------------------------------


@dataclass
class _Source:
    path: str
    data: dict[str, Any]
    index: LineIndex


def _read(path: Path) -> _Source:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), None, f"cannot read: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        line = int(match.group(1)) if match else None
        if line is None and "end of document" in message:
            line = max(1, len(text.splitlines()))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        message = re.sub(r"\s*\(at end of document\)", " at end of document", message)
        raise ConfigError([ConfigIssue(str(path), line, f"TOML syntax: {message}")]) from exc
    except ValueError as exc:  # Python refuses an int literal of more than 4300 digits
        line = _line_of(text, _LONG_INT_RE)
        message = "a number with thousands of digits (far past any bound)"
        raise ConfigError([ConfigIssue(str(path), line, message)]) from exc
    return _Source(str(path), data, LineIndex(text))


_LONG_INT_RE = re.compile(r"[0-9_]{4300}")


def _line_of(text: str, pattern: re.Pattern[str]) -> int | None:
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def _read_all(main: Path) -> tuple[list[_Source], list[ConfigIssue]]:
    """The main file and its drop-ins (recursively), each file once; include issues."""
    sources: list[_Source] = []
    seen: set[Path] = set()
    issues: list[ConfigIssue] = []

    def visit(path: Path) -> None:
        resolved = path.resolve()
        if resolved in seen:
            return
        seen.add(resolved)
        source = _read(path)
        sources.append(source)
        includes = source.data.pop("include", [])
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            line = source.index.line("include")
            raise ConfigError([ConfigIssue(source.path, line, "include must be a list of globs")])
        for pattern in includes:
            full = pattern if os.path.isabs(pattern) else str(path.parent / pattern)
            problem = _include_problem(pattern, full)
            if problem:
                issues.append(ConfigIssue(source.path, source.index.line("include"), problem))
                continue
            for match in sorted(glob.glob(full)):
                if os.path.isfile(match):  # a glob may also match a directory: not a drop-in
                    visit(Path(match))

    visit(main)
    return sources, issues


def _include_problem(pattern: str, full: str) -> str | None:
    """An entry without a wildcard names one file: a typo must not pass as "no drop-ins".

    With a wildcard, matching nothing is fine (an empty conf.d is the usual start).
    """
    if glob.has_magic(pattern):
        return None
    if not os.path.exists(full):
        return f'include: "{pattern}" names no file ({full}); only a glob may match nothing'
    if not os.path.isfile(full):
        glob_of = f"{pattern.rstrip('/')}/*.toml"
        return f'include: "{pattern}" is not a file ({full}); for a directory use "{glob_of}"'
    return None


# --- validation -----------------------------------------------------------


def _at(error: msgspec.ValidationError) -> tuple[list[str], str]:
    """Split msgspec's message into the key path and the complaint."""
    message = str(error)
    match = re.search(r" - at `\$([^`]*)`$", message)
    path: list[str] = []
    if match:
        path = [p for p in re.split(r"[.\[\]]", match.group(1)) if p and p != "..."]
        message = message[: match.start()]
    unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
    if unknown:
        path.append(unknown.group(1))
        message = f"unknown key `{unknown.group(1)}`"
    return path, message


class _Validator:
    """Collects every issue across all files before giving up."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources
        self.issues: list[ConfigIssue] = []

    def issue(self, source: _Source, path: tuple[str, ...], message: str) -> None:
        self.issues.append(ConfigIssue(source.path, source.index.line(*path), message))

    def convert(self, source: _Source, path: tuple[str, ...], value: Any, shape: type) -> Any:
        try:
            return msgspec.convert(value, shape)
        except msgspec.ValidationError as exc:
            inner, message = _at(exc)
            where = ".".join((*path, *inner))
            self.issue(source, (*path, *inner), f"{where}: {message}")
            return None

    def bounded(
        self,
        source: _Source,
        path: tuple[str, ...],
        where: str,
        key: str,
        value: float,
    ) -> bool:
        """Within BOUNDS[key]; else an issue at `path` saying the bound and the value."""
        bound = BOUNDS[key]
        if bound.holds(value):
            return True
        self.issue(source, path, f"{where}: {bound.describe()} (got {_num(value)})")
        return False

    def counted(
        self, source: _Source, path: tuple[str, ...], where: str, key: str, count: int, what: str
    ) -> bool:
        """A count of the tree's, at most BOUNDS[key]: "WHERE: 120000 WHAT, more than ..." """
        most = int(BOUNDS[key].high)
        if count <= most:
            return True
        self.issue(source, path, f"{where}: {count} {what}, more than the {most} allowed")
        return False

    def within_bounds(
        self, source: _Source, path: tuple[str, ...], where: str, section: str, config: Any
    ) -> bool:
        """Every BOUNDS key of `section` ("daemon", "supervisor", "agent") that `config` sets."""
        ok = True
        for key in BOUNDS:
            head, _, attr = key.partition(".")
            if head != section:
                continue
            parts = attr.split(".")
            value = config
            for part in parts:
                value = getattr(value, part)
            # None (replicas unset), "brutal_kill" and "infinity" have no bound.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = self.bounded(source, (*path, *parts), f"{where}.{attr}", key, value) and ok
        return ok


@dataclass
class _Defined:
    """A named agent or supervisor and the file that defined it."""

    kind: Literal["agent", "supervisor"]
    source: _Source
    config: Any
    keys: frozenset[str] = frozenset()  # the keys the file sets (a default is not "set")


def load(path: str | os.PathLike[str] | None = None) -> Spec:
    """Read, validate and build the spec; raise ConfigError on any problem."""
    main = find_config(str(path) if path is not None else None)
    sources, issues = _read_all(main)
    return build(sources, issues)


def build(sources: list[_Source], issues: list[ConfigIssue] | None = None) -> Spec:
    """Validate parsed sources into a Spec (ConfigError listing every issue).

    Everything is checked before anything is expanded: a pool's members are only built
    once every count is known to be within its bound (SPEC §11).
    """
    v = _Validator(sources)
    v.issues.extend(issues or [])  # from reading the files: reported with the rest
    main = sources[0]
    daemon_cfg, root_cfg, defined = _collect(v, sources)
    if daemon_cfg is None or root_cfg is None or v.issues:
        raise ConfigError(v.issues)
    daemon = _daemon_spec(v, main, daemon_cfg)
    dynamic = _dynamic_templates(root_cfg, defined)
    _transient_by_default(defined, dynamic)
    templates = _agent_templates(v, defined, daemon)
    sups, parent = _check_tree(v, defined, root_cfg, main, dynamic)
    if v.issues:
        raise ConfigError(v.issues)
    spawnable = {n: t for n, t in templates.items() if n in dynamic}
    agents, instances = _expand({n: t for n, t in templates.items() if n not in dynamic})
    pools = {
        name: PoolSpec(name, template.replicas, parent[name])
        for name, template in templates.items()
        if template.replicas is not None and name not in dynamic
    }
    return Spec(
        daemon=daemon,
        root=ROOT,
        supervisors=_supervisor_specs(sups, instances),
        agents=agents,
        pools=pools,
        files=tuple(s.path for s in sources),
        templates={n: AgentSpec(name=n, pool=None, **t.fields) for n, t in spawnable.items()},
    )


def _dynamic_templates(root_cfg: SupervisorConfig, defined: dict[str, _Defined]) -> set[str]:
    """The agents some dynamic supervisor names as its `template` (not started on their own)."""
    configs = [root_cfg] + [e.config for e in defined.values() if e.kind == "supervisor"]
    return {
        c.template
        for c in configs
        if c.strategy == "dynamic" and c.template in defined and defined[c.template].kind == "agent"
    }


def _transient_by_default(defined: dict[str, _Defined], dynamic: set[str]) -> None:
    """A template's children are transient unless its table says `restart` itself (SPEC §12).

    "Itself" means the key is in the file: `restart = "permanent"` written out keeps
    children permanent, while leaving it out (the default for a configured agent)
    makes them transient, as OTP's dynamic children usually are.
    """
    for name in dynamic:
        entry = defined[name]
        if "restart" not in entry.keys:
            entry.config = msgspec.structs.replace(entry.config, restart="transient")


def _collect(
    v: _Validator, sources: list[_Source]
) -> tuple[DaemonConfig | None, SupervisorConfig | None, dict[str, _Defined]]:
    """[daemon] and [supervisor] (main file only), and every named agent and supervisor."""
    main = sources[0]
    daemon_cfg: DaemonConfig | None = DaemonConfig()
    root_cfg: SupervisorConfig | None = SupervisorConfig()
    defined: dict[str, _Defined] = {}
    for source in sources:
        for key in source.data:
            if key not in {"daemon", "supervisor", "supervisors", "agents"}:
                v.issue(source, (key,), f"unknown key `{key}`")
        for key in ("daemon", "supervisor"):
            if key in source.data and source is not main:
                v.issue(source, (key,), f"[{key}] may only be set in the main file {main.path}")
        if source is main:
            daemon_cfg = v.convert(source, ("daemon",), source.data.get("daemon", {}), DaemonConfig)
            root_cfg = v.convert(
                source, ("supervisor",), source.data.get("supervisor", {}), SupervisorConfig
            )
        for section, kind, shape in (
            ("supervisors", "supervisor", SupervisorConfig),
            ("agents", "agent", AgentConfig),
        ):
            table = source.data.get(section, {})
            if not isinstance(table, dict):
                v.issue(source, (section,), f"[{section}] must be a table of named tables")
                continue
            for name, value in table.items():
                _define(v, defined, source, section, kind, shape, name, value)
    return daemon_cfg, root_cfg, defined


def _define(
    v: _Validator,
    defined: dict[str, _Defined],
    source: _Source,
    section: str,
    kind: Literal["agent", "supervisor"],
    shape: type,
    name: str,
    value: Any,
) -> None:
    path = (section, name)
    if not NAME_RE.match(name):
        v.issue(source, path, f"bad name `{name}`: use letters, digits, `_` and `-`")
        return
    short = name if len(name) <= 40 else f"{name[:40]}..."
    where, length = f"{section}.{short}", len(name)
    if not v.counted(source, path, where, "tree.name_length", length, "characters in the name"):
        return
    if name in RESERVED_NAMES or name == ROOT:
        v.issue(source, path, f"`{name}` is a reserved name")
        return
    if name in defined:
        first = defined[name]
        v.issue(
            source,
            path,
            f"`{name}` is defined twice: as {first.kind} in {first.source.path} "
            f"and as {kind} in {source.path}",
        )
        return
    if not isinstance(value, dict):
        v.issue(source, path, f"{section}.{name} must be a table")
        return
    config = v.convert(source, path, value, shape)
    if config is not None:
        defined[name] = _Defined(kind, source, config, frozenset(value))


def _daemon_spec(v: _Validator, main: _Source, cfg: DaemonConfig) -> DaemonSpec:
    base = Path(main.path).resolve().parent
    where = locate_daemon(Path(main.path), msgspec.structs.asdict(cfg))
    runtime_dir = where.runtime_dir

    def sub(value: str) -> str:
        return value.replace("{runtime_dir}", runtime_dir)

    log_dir = sub(cfg.log_dir) if cfg.log_dir else log_dir_default(runtime_dir)
    log_dir = str(base / log_dir) if not os.path.isabs(log_dir) else log_dir
    state_dir = sub(cfg.state_dir) if cfg.state_dir else state_dir_default()
    state_dir = str(base / state_dir) if not os.path.isabs(state_dir) else state_dir
    _check_state_dir(v, main, state_dir, runtime_dir, explicit=cfg.state_dir is not None)
    keys_dir = where.keys_dir
    for key, endpoint in (("control", where.control), ("bus", where.bus)):
        line = ("daemon", key)
        try:
            needs_keys = parse_endpoint(endpoint).needs_keys
        except ValueError as exc:
            v.issue(main, line, f"daemon.{key}: {exc}")
            continue
        if needs_keys and not keys_dir:
            v.issue(
                main,
                line,
                f"daemon.{key}: a tcp endpoint needs CurveZMQ keys "
                "(set daemon.keys_dir; `agentd keys DIR` creates them)",
            )
    v.within_bounds(main, ("daemon",), "daemon", "daemon", cfg)
    tls = {
        key: _path(base, sub(value)) if value else None
        for key, value in (("cert", cfg.metrics_tls_cert), ("key", cfg.metrics_tls_key))
    }
    if cfg.metrics is not None:
        _check_metrics(v, main, cfg.metrics, tls["cert"], tls["key"])
    return DaemonSpec(
        runtime_dir=runtime_dir,
        log_dir=log_dir,
        control=where.control,
        bus=where.bus,
        state_dir=state_dir,
        journal_sync=cfg.journal_sync,
        shutdown_timeout=cfg.shutdown_timeout,
        log_max_bytes=cfg.log_max_bytes,
        log_backups=cfg.log_backups,
        memory_check_interval=cfg.memory_check_interval,
        keys_dir=keys_dir,
        max_frame=cfg.max_frame,
        death_signal=cfg.death_signal,
        metrics=cfg.metrics,
        metrics_tls_cert=tls["cert"],
        metrics_tls_key=tls["key"],
        event_history=cfg.event_history,
        cgroup=cfg.cgroup,
        cgroup_root=_cgroup_root(v, main, cfg.cgroup_root),
    )


def _path(base: Path, value: str) -> str:
    """A path from the config: relative ones are relative to the main file's folder."""
    return value if os.path.isabs(value) else str(base / value)


def _check_metrics(
    v: _Validator, main: _Source, address: str, cert: str | None, key: str | None
) -> None:
    """daemon.metrics: HOST:PORT; anything but loopback only over TLS (cert and key)."""
    from .metrics import is_loopback, parse_address

    try:
        host, _ = parse_address(address)
    except ValueError as exc:
        v.issue(main, ("daemon", "metrics"), f"daemon.metrics: {exc}")
        return
    for name, path in (("metrics_tls_cert", cert), ("metrics_tls_key", key)):
        if path is None:
            continue
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            v.issue(main, ("daemon", name), f"daemon.{name}: cannot read {path}")
    if (cert is None) != (key is None):
        missing = "metrics_tls_key" if key is None else "metrics_tls_cert"
        have = "metrics_tls_cert" if key is None else "metrics_tls_key"
        v.issue(main, ("daemon", have), f"daemon.{have} needs daemon.{missing} too")
    elif cert is None and not is_loopback(host):
        v.issue(
            main,
            ("daemon", "metrics"),
            f"daemon.metrics: {address} is not a loopback address; serving metrics there "
            "needs TLS (set daemon.metrics_tls_cert and daemon.metrics_tls_key)",
        )


def _cgroup_root(v: _Validator, main: _Source, root: str | None) -> str | None:
    if root is not None and not os.path.isabs(root):
        v.issue(main, ("daemon", "cgroup_root"), "daemon.cgroup_root: must be an absolute path")
        return None
    return os.path.normpath(root) if root else None


def _check_state_dir(
    v: _Validator, main: _Source, state_dir: str, runtime_dir: str, explicit: bool
) -> None:
    """state_dir must survive a reboot (not on the runtime dir's tmpfs) and be writable."""
    where = "daemon.state_dir" if explicit else "daemon.state_dir (default)"
    state, run = os.path.realpath(state_dir), os.path.realpath(runtime_dir)
    if state == run or state.startswith(run.rstrip("/") + "/"):
        v.issue(
            main,
            ("daemon", "state_dir"),
            f"{where}: {state_dir} is under runtime_dir {runtime_dir}, which does not "
            "survive a reboot; durable state needs a directory of its own",
        )
        return
    problem = state_dir_problem(state_dir)
    if problem:
        v.issue(main, ("daemon", "state_dir"), f"{where}: {problem}")


def state_dir_problem(path: str) -> str | None:
    """Why the daemon could not create or write `path` (None: it can), touching nothing.

    `agentd check` must not create directories, so this finds the nearest existing
    ancestor and asks whether it is a directory we may write. access(2) also answers
    for root on a read-only file system (EROFS).
    """
    target = Path(path)
    for candidate in (target, *target.parents):
        try:
            mode = os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet (or under a file: that file is found further up)
        except OSError as exc:
            return f"cannot create {path}: {candidate}: {exc.strerror}"
        verb = "write" if candidate == target else "create"
        if not stat.S_ISDIR(mode):
            return f"cannot {verb} {path}: {candidate} is not a directory"
        if not os.access(candidate, os.W_OK | os.X_OK):
            return f"cannot {verb} {path}: {candidate} is not writable"
        return None
    return f"cannot create {path}"


def _signal_number(name: str) -> int | None:
    name = name.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    number = getattr(signal.Signals, name, None)
    return int(number) if number is not None else None


@dataclass
class _Template:
    """A valid agent before expansion: a pool's members are made from it only at the end."""

    fields: dict[str, Any]  # AgentSpec's fields but name and pool
    replicas: int | None  # None: a single agent, not a pool


def _agent_templates(
    v: _Validator, defined: dict[str, _Defined], daemon: DaemonSpec
) -> dict[str, _Template]:
    """Every agent checked, key by key, and nothing expanded: each issue is reported."""
    templates: dict[str, _Template] = {}
    for name, entry in defined.items():
        if entry.kind == "agent":
            template = _agent_template(v, name, entry.source, entry.config, daemon)
            if template is not None:
                templates[name] = template
    return templates


def _agent_template(
    v: _Validator, name: str, src: _Source, cfg: AgentConfig, daemon: DaemonSpec
) -> _Template | None:
    path = ("agents", name)

    def sub(value: str) -> str:
        return value.replace("{runtime_dir}", daemon.runtime_dir)

    argv = _argv(v, src, path, name, cfg, sub)
    stop_signal = _signal_number(cfg.stop_signal)
    if stop_signal is None:
        v.issue(src, (*path, "stop_signal"), f"agents.{name}.stop_signal: unknown signal")
    ok = v.within_bounds(src, path, f"agents.{name}", "agent", cfg)
    ok = _significant_ok(v, src, path, f"agents.{name}", cfg) and ok
    ok = _start_ok(v, src, path, name, cfg) and ok
    ok = _patterns_ok(v, src, path, name, cfg.subscribe) and ok
    ok = _text_ok(v, src, path, name, cfg) and ok
    if cfg.user is not None and not _user_exists(cfg.user):
        v.issue(src, (*path, "user"), f"agents.{name}.user: no such user `{cfg.user}`")
        ok = False
    if cfg.group is not None and not _group_exists(cfg.group):
        v.issue(src, (*path, "group"), f"agents.{name}.group: no such group `{cfg.group}`")
        ok = False
    cwd = sub(cfg.cwd) if cfg.cwd else None
    if cwd and not os.path.isabs(cwd):
        cwd = str(Path(src.path).resolve().parent / cwd)
    if ok and argv is not None and cfg.command is not None:
        ok = _program_ok(v, src, path, name, argv[0], sub(cfg.env.get("PATH", "")), cwd)
    if not ok or argv is None or stop_signal is None:
        return None
    fields = dict(
        argv=argv,
        bus_agent=cfg.module is not None,
        module=cfg.module,
        start=cfg.start or ("fork" if cfg.module is not None else "exec"),
        restart=cfg.restart,
        shutdown=_shutdown(cfg.shutdown),
        stop_signal=stop_signal,
        env=tuple((k, sub(val)) for k, val in cfg.env.items()),
        cwd=cwd,
        user=cfg.user,
        group=cfg.group,
        subscribe=tuple(cfg.subscribe),
        heartbeat=cfg.heartbeat,
        start_seconds=cfg.start_seconds,
        ack=cfg.ack,
        restart_delay=cfg.restart_delay,
        significant=cfg.significant,
        memory_ksm=cfg.memory_ksm,
        redirect_stderr=cfg.redirect_stderr,
        limits=cfg.limits,
        max_deliveries=cfg.max_deliveries,
        retry_backoff=cfg.retry_backoff,
        max_in_flight=cfg.max_in_flight,
        max_pending=cfg.max_pending,
    )
    return _Template(fields, cfg.replicas)


def _shutdown(value: float | str) -> float | None:
    """Seconds of grace; None for brutal_kill; inf for infinity (no SIGKILL at all)."""
    if value == "brutal_kill":
        return None
    return math.inf if value == "infinity" else float(value)


def _start_ok(v: _Validator, src: _Source, path: tuple[str, ...], name: str, cfg: Any) -> bool:
    """Only a module agent can be forked from a warm template: a command is exec'd.

    memory_ksm is set in a forked agent just after the clone (exec would need the
    kernel to keep it across exec, which only 6.7 and later do).
    """
    if cfg.start == "fork" and cfg.command is not None:
        v.issue(
            src,
            (*path, "start"),
            f'agents.{name}.start: "fork" needs a module agent; a command is always "exec"',
        )
        return False
    forked = cfg.start == "fork" or (cfg.start is None and cfg.module is not None)
    if cfg.memory_ksm and not forked:
        v.issue(
            src,
            (*path, "memory_ksm"),
            f'agents.{name}.memory_ksm: only a forked agent (start = "fork") sets it; '
            "an exec agent's pages are not a template's copies",
        )
        return False
    return True


def _significant_ok(
    v: _Validator, src: _Source, path: tuple[str, ...], where: str, cfg: Any
) -> bool:
    """OTP's rule: only a transient or temporary child may be significant."""
    if cfg.significant and cfg.restart == "permanent":
        v.issue(
            src,
            (*path, "significant"),
            f"{where}.significant: a permanent child is always restarted, so it never ends; "
            'set restart = "transient" or "temporary"',
        )
        return False
    return True


def _argv(
    v: _Validator,
    src: _Source,
    path: tuple[str, ...],
    name: str,
    cfg: AgentConfig,
    sub: Any,
) -> tuple[str, ...] | None:
    """The agent's argv: its command, or the SDK runner for a module agent."""
    if (cfg.module is None) == (cfg.command is None):
        v.issue(src, path, f"agents.{name}: set exactly one of `module` or `command`")
        return None
    if cfg.module is not None:
        if not MODULE_RE.match(cfg.module):
            v.issue(src, (*path, "module"), f"agents.{name}.module: expected 'pkg.mod:Class'")
            return None
        return (sys.executable, "-m", "agentd.agents", cfg.module)
    if not cfg.command:
        v.issue(src, (*path, "command"), f"agents.{name}.command: must not be empty")
        return None
    return tuple(sub(a) for a in cfg.command)


def _program_ok(
    v: _Validator,
    src: _Source,
    path: tuple[str, ...],
    name: str,
    program: str,
    env_path: str,
    cwd: str | None,
) -> bool:
    """command[0] resolves as the runtime will resolve it (spawn.find_program), or an issue.

    Like systemd-analyze verify for ExecStart=: an absolute path must be an executable
    file, a bare name must be found on PATH (the agent's own `env.PATH`, else this
    process's, which `agentd run` inherits the same way).
    """
    search = env_path or os.environ.get("PATH", os.defpath)
    try:
        find_program(program, search, cwd)
    except FileNotFoundError as exc:
        where = f" ({search})" if os.sep not in program else ""
        why = f'agents.{name}.command: "{program}": {exc.strerror}{where}'
        v.issue(src, (*path, "command"), why)
        return False
    return True


def _patterns_ok(
    v: _Validator, src: _Source, path: tuple[str, ...], name: str, patterns: list[str]
) -> bool:
    """Subscriptions the broker's trie can hold (an empty segment would never match)."""
    bad = [p for p in patterns if not patterns_valid(p)]
    for pattern in bad:
        v.issue(
            src,
            (*path, "subscribe"),
            f'agents.{name}.subscribe: "{pattern}" is not a pattern: '
            "its dot-separated segments must not be empty",
        )
    return not bad


def _text_ok(
    v: _Validator, src: _Source, path: tuple[str, ...], name: str, cfg: AgentConfig
) -> bool:
    """Strings exec and the environment can carry: no NUL byte, env names without `=`."""
    bad: list[tuple[str, str]] = []
    texts = [("command", a) for a in cfg.command or []]
    texts += [("env", value) for value in cfg.env.values()]
    texts += [(k, t) for k, t in (("cwd", cfg.cwd), ("user", cfg.user), ("group", cfg.group)) if t]
    bad += [(key, "must not contain a NUL byte") for key, text in texts if "\0" in text]
    for env_name in cfg.env:
        if not env_name or "=" in env_name or "\0" in env_name:
            bad.append(("env", f"`{env_name}` is not a variable name (empty, `=` or NUL)"))
    for key, why in dict.fromkeys(bad):
        v.issue(src, (*path, key), f"agents.{name}.{key}: {why}")
    return not bad


def _expand(templates: dict[str, _Template]) -> tuple[dict[str, AgentSpec], dict[str, list[str]]]:
    """Agent specs by instance name, and each agent's instance names (pools expanded)."""
    specs: dict[str, AgentSpec] = {}
    instances: dict[str, list[str]] = {}
    for name, template in templates.items():
        if template.replicas is None:
            specs[name] = AgentSpec(name=name, pool=None, **template.fields)
            instances[name] = [name]
            continue
        members = [pool_member(name, i) for i in range(template.replicas)]
        for member in members:
            specs[member] = AgentSpec(name=member, pool=name, **template.fields)
        instances[name] = members
    return specs, instances


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        return False
    return True


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))
    except KeyError:
        return False
    return True


@dataclass
class _Sup:
    """A supervisor as configured: where it is said, and its children before expansion."""

    config: SupervisorConfig
    source: _Source
    path: tuple[str, ...]  # ("supervisor",) for the root, else ("supervisors", NAME)
    children: list[str]

    @property
    def where(self) -> str:
        return ".".join(self.path)


def _check_tree(
    v: _Validator,
    defined: dict[str, _Defined],
    root_cfg: SupervisorConfig,
    main: _Source,
    dynamic: set[str],
) -> tuple[dict[str, _Sup], dict[str, str]]:
    """Supervisors and each child's parent; checks references, cycles, intensity, sizes.

    All of it from the configured names and `replicas`, before any pool is expanded.
    """
    sups = {ROOT: _Sup(root_cfg, main, ("supervisor",), list(root_cfg.children or []))}
    for name, entry in defined.items():
        if entry.kind == "supervisor":
            children = list(entry.config.children or [])
            sups[name] = _Sup(entry.config, entry.source, ("supervisors", name), children)
    default_root = root_cfg.children is None and root_cfg.strategy != "dynamic"
    parent = _claim(v, sups, defined, default_root=default_root, templates=dynamic)
    for sup in sups.values():
        _dynamic_ok(v, sup, defined, dynamic)
    _check_cycles(v, sups)
    for sup in sups.values():
        v.within_bounds(sup.source, sup.path, sup.where, "supervisor", sup.config)
        _significant_ok(v, sup.source, sup.path, sup.where, sup.config)
    if root_cfg.significant:
        v.issue(
            main,
            ("supervisor", "significant"),
            "supervisor.significant: the root has no "
            "supervisor above it (auto_shutdown of the root ends agentd)",
        )
    _check_sizes(v, sups, defined)
    return sups, parent


def _dynamic_ok(v: _Validator, sup: _Sup, defined: dict[str, _Defined], dynamic: set[str]) -> None:
    """A dynamic supervisor: a template agent, no configured children; others: neither key."""
    cfg, where = sup.config, sup.where
    if cfg.strategy != "dynamic":
        for key in ("template", "max_children"):
            if key in _keys_of(sup, defined):
                v.issue(
                    sup.source,
                    (*sup.path, key),
                    f'{where}.{key}: only a supervisor with strategy = "dynamic" has one',
                )
        return
    if sup.children:
        v.issue(
            sup.source,
            (*sup.path, "children"),
            f"{where}.children: a dynamic supervisor has no configured children "
            "(they are spawned at run time from its `template`)",
        )
    if cfg.template is None:
        v.issue(
            sup.source, (*sup.path, "strategy"), f"{where}: a dynamic supervisor needs `template`"
        )
    elif cfg.template not in dynamic:
        what = "a supervisor" if cfg.template in defined else "not defined"
        v.issue(
            sup.source,
            (*sup.path, "template"),
            f"{where}.template: `{cfg.template}` is {what}; name an [agents.*] table",
        )
    elif defined[cfg.template].config.replicas is not None:
        entry = defined[cfg.template]
        v.issue(
            entry.source,
            ("agents", cfg.template, "replicas"),
            f"agents.{cfg.template}.replicas: a template (of `{sup.where}`) is not a pool",
        )


def _keys_of(sup: _Sup, defined: dict[str, _Defined]) -> frozenset[str]:
    """The keys a supervisor's own table sets ([supervisor]'s are found by line)."""
    if sup.path == ("supervisor",):
        table = sup.source.data.get("supervisor", {})
        return frozenset(table) if isinstance(table, dict) else frozenset()
    return defined[sup.path[-1]].keys


def _claim(
    v: _Validator,
    sups: dict[str, _Sup],
    defined: dict[str, _Defined],
    default_root: bool,
    templates: set[str] = frozenset(),  # type: ignore[assignment]
) -> dict[str, str]:
    """child -> the supervisor that lists it; unknown, doubly listed and orphan children."""
    claimed: dict[str, str] = {}
    for sup_name, sup in sups.items():
        for child in sup.children:
            where = (*sup.path, "children")
            if child not in defined:
                v.issue(sup.source, where, f"{sup.where}.children: unknown child `{child}`")
            elif child in templates:
                v.issue(
                    sup.source,
                    where,
                    f"{sup.where}.children: `{child}` is a dynamic supervisor's template, "
                    "not started on its own",
                )
            elif child in claimed:
                v.issue(
                    sup.source,
                    where,
                    f"{sup.where}.children: `{child}` is already a child of `{claimed[child]}`",
                )
            else:
                claimed[child] = sup_name
    if default_root:  # every agent and supervisor not named elsewhere, in file order
        sups[ROOT].children = [n for n in defined if n not in claimed and n not in templates]
    for name in sups[ROOT].children:
        claimed.setdefault(name, ROOT)
    for name, entry in defined.items():
        if name not in claimed and name not in templates:
            path = ("agents" if entry.kind == "agent" else "supervisors", name)
            v.issue(entry.source, path, f"`{name}` is not a child of any supervisor")
    return claimed


def _instances(entry: _Defined) -> int:
    """How many instances an agent is, counted from its config (0 if replicas is bad)."""
    replicas = entry.config.replicas
    if replicas is None:
        return 1
    return replicas if BOUNDS["agent.replicas"].holds(replicas) else 0  # already reported


def _check_sizes(v: _Validator, sups: dict[str, _Sup], defined: dict[str, _Defined]) -> None:
    """The tree's bounds (SPEC §11), from counts alone: nothing is expanded yet."""
    counts = {n: _instances(e) for n, e in defined.items() if e.kind == "agent"}
    total = 0
    for name, count in counts.items():  # in file order: the agent that crosses the bound
        total += count
        src, path = defined[name].source, ("agents", name, "replicas")
        what = "agent instances in all up to here (a pool counts each member)"
        if not v.counted(src, path, f"agents.{name}", "tree.instances", total, what):
            break
    most = int(BOUNDS["tree.supervisors"].high)
    if len(sups) > most:
        sup = list(sups.values())[most]
        what = "supervisors in all (the root included)"
        v.counted(sup.source, sup.path, sup.where, "tree.supervisors", len(sups), what)
    for sup in sups.values():
        size = sum(counts.get(child, 1) for child in sup.children)
        what = "children (a pool counts each member)"
        v.counted(sup.source, (*sup.path, "children"), sup.where, "tree.children", size, what)
    _check_depth(v, sups)


def _check_depth(v: _Validator, sups: dict[str, _Sup]) -> None:
    """Supervisors nested too deep: breadth first from the root, cycles cannot loop it."""
    depth = {ROOT: 0}
    queue = deque([ROOT])
    while queue:
        name = queue.popleft()
        for child in sups[name].children:
            if child not in sups or child in depth:
                continue
            depth[child] = depth[name] + 1
            sup = sups[child]
            what = "supervisors deep below root (itself included)"
            if v.counted(sup.source, sup.path, sup.where, "tree.depth", depth[child], what):
                queue.append(child)  # past the bound: one issue for the branch, not one per level


def _supervisor_specs(
    sups: dict[str, _Sup], instances: dict[str, list[str]]
) -> dict[str, SupervisorSpec]:
    """Supervisor specs with children expanded to instance names (all checked already)."""

    def expand(children: list[str]) -> tuple[str, ...]:
        out: list[str] = []
        for child in children:
            out.extend(instances.get(child, [child]))
        return tuple(out)

    return {
        name: SupervisorSpec(
            name=name,
            strategy=sup.config.strategy,
            max_restarts=sup.config.max_restarts,
            max_seconds=sup.config.max_seconds,
            restart="permanent" if name == ROOT else sup.config.restart,
            children=expand(sup.children),
            auto_shutdown=sup.config.auto_shutdown,
            significant=sup.config.significant,
            template=sup.config.template if sup.config.strategy == "dynamic" else None,
            max_children=sup.config.max_children,
        )
        for name, sup in sups.items()
    }


def _check_cycles(v: _Validator, sups: dict[str, _Sup]) -> None:
    """A supervisor that (transitively) contains itself is an error."""
    for start, sup in sups.items():
        stack = list(sup.children)
        seen: set[str] = set()
        while stack:
            child = stack.pop()
            if child == start:
                where = (*sup.path, "children")
                v.issue(sup.source, where, f"{sup.where}: cycle through `{start}`")
                break
            if child in seen or child not in sups:
                continue
            seen.add(child)
            stack.extend(sups[child].children)
