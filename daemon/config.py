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
import os
import pwd
import re
import signal
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from .locate import (
    ConfigError,
    ConfigIssue,
    find_config,
    log_dir_default,
    runtime_dir_default,
    state_dir_default,
)
from .spec import (
    RESERVED_NAMES,
    ROOT,
    AgentSpec,
    DaemonSpec,
    JournalSync,
    Limits,
    PoolSpec,
    RestartType,
    Spec,
    Strategy,
    SupervisorSpec,
    pool_member,
)

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
MODULE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# --- loose shapes: what a file may say -------------------------------------


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class DaemonConfig(_Strict):
    runtime_dir: str | None = None
    log_dir: str | None = None
    state_dir: str | None = None
    journal_sync: JournalSync = "batch"
    control: str = "ipc://{runtime_dir}/control.sock"
    bus: str = "ipc://{runtime_dir}/bus.sock"
    shutdown_timeout: float = 30.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    memory_check_interval: float = 2.0
    keys_dir: str | None = None
    max_frame: int = 1024 * 1024
    death_signal: bool = True


class SupervisorConfig(_Strict):
    strategy: Strategy = "one_for_one"
    max_restarts: int = 3
    max_seconds: float = 5.0
    restart: RestartType = "permanent"
    children: list[str] | None = None


class AgentConfig(_Strict):
    module: str | None = None
    command: list[str] | None = None
    restart: RestartType = "permanent"
    shutdown: float | Literal["brutal_kill"] = 5.0
    stop_signal: str = "SIGTERM"
    env: dict[str, str] = {}
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    subscribe: list[str] = []
    heartbeat: float = 10.0
    start_seconds: float = 1.0
    replicas: int | None = None
    ack: bool = False
    restart_delay: float = 0.0
    limits: Limits = Limits()
    max_deliveries: int = 5
    retry_backoff: float = 0.5
    max_in_flight: int = 100
    max_pending: int = 10_000


# Durable delivery bounds (SPEC §10): (key, lowest, highest) for the integer keys.
DELIVERY_BOUNDS = (
    ("max_deliveries", 1, 1000),
    ("max_in_flight", 1, 100_000),
    ("max_pending", 1, 10_000_000),
)
RETRY_BACKOFF_MAX = 30.0  # seconds; the broker's doubling stops there too


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
    return _Source(str(path), data, LineIndex(text))


def _read_all(main: Path) -> list[_Source]:
    """The main file and its drop-ins (recursively), each file once."""
    sources: list[_Source] = []
    seen: set[Path] = set()

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
            for match in sorted(glob.glob(full)):
                visit(Path(match))

    visit(main)
    return sources


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


@dataclass
class _Defined:
    """A named agent or supervisor and the file that defined it."""

    kind: Literal["agent", "supervisor"]
    source: _Source
    config: Any


def load(path: str | os.PathLike[str] | None = None) -> Spec:
    """Read, validate and build the spec; raise ConfigError on any problem."""
    main = find_config(str(path) if path is not None else None)
    sources = _read_all(main)
    return build(sources)


def build(sources: list[_Source]) -> Spec:
    """Validate parsed sources into a Spec (ConfigError listing every issue)."""
    v = _Validator(sources)
    main = sources[0]
    daemon_cfg = DaemonConfig()
    root_cfg = SupervisorConfig()
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

    if daemon_cfg is None or root_cfg is None or v.issues:
        raise ConfigError(v.issues)
    daemon = _daemon_spec(v, main, daemon_cfg)
    agents, pools_of = _agent_specs(v, defined, daemon)
    supervisors = _supervisor_specs(v, defined, root_cfg, main, pools_of)
    if v.issues:
        raise ConfigError(v.issues)
    pools = {
        name: PoolSpec(name, defined[name].config.replicas, _owner(supervisors, members[0]))
        for name, members in pools_of.items()
        if defined[name].config.replicas is not None
    }
    return Spec(
        daemon=daemon,
        root=ROOT,
        supervisors=supervisors,
        agents=agents,
        pools=pools,
        files=tuple(s.path for s in sources),
    )


def _owner(supervisors: dict[str, SupervisorSpec], child: str) -> str:
    return next(s.name for s in supervisors.values() if child in s.children)


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
        defined[name] = _Defined(kind, source, config)


def _daemon_spec(v: _Validator, main: _Source, cfg: DaemonConfig) -> DaemonSpec:
    base = Path(main.path).resolve().parent
    runtime_dir = cfg.runtime_dir or runtime_dir_default()
    runtime_dir = str(base / runtime_dir) if not os.path.isabs(runtime_dir) else runtime_dir

    def sub(value: str) -> str:
        return value.replace("{runtime_dir}", runtime_dir)

    log_dir = sub(cfg.log_dir) if cfg.log_dir else log_dir_default(runtime_dir)
    log_dir = str(base / log_dir) if not os.path.isabs(log_dir) else log_dir
    state_dir = sub(cfg.state_dir) if cfg.state_dir else state_dir_default()
    state_dir = str(base / state_dir) if not os.path.isabs(state_dir) else state_dir
    _check_state_dir(v, main, state_dir, runtime_dir, explicit=cfg.state_dir is not None)
    keys_dir = sub(cfg.keys_dir) if cfg.keys_dir else None
    for key, endpoint in (("control", sub(cfg.control)), ("bus", sub(cfg.bus))):
        line = ("daemon", key)
        if endpoint.startswith("tcp://"):
            if not keys_dir:
                v.issue(
                    main,
                    line,
                    f"daemon.{key}: a tcp endpoint needs CurveZMQ keys "
                    "(set daemon.keys_dir; `agentd keys DIR` creates them)",
                )
        elif not endpoint.startswith("ipc://"):
            v.issue(main, line, f"daemon.{key}: endpoint must be ipc://PATH or tcp://HOST:PORT")
    for key, value, minimum in (
        ("shutdown_timeout", cfg.shutdown_timeout, 0.0),
        ("memory_check_interval", cfg.memory_check_interval, 0.05),
        ("log_max_bytes", cfg.log_max_bytes, 1024),
        ("log_backups", cfg.log_backups, 0),
        ("max_frame", cfg.max_frame, 1024),
    ):
        if value < minimum:
            v.issue(main, ("daemon", key), f"daemon.{key} must be at least {minimum}")
    return DaemonSpec(
        runtime_dir=runtime_dir,
        log_dir=log_dir,
        control=sub(cfg.control),
        bus=sub(cfg.bus),
        state_dir=state_dir,
        journal_sync=cfg.journal_sync,
        shutdown_timeout=cfg.shutdown_timeout,
        log_max_bytes=cfg.log_max_bytes,
        log_backups=cfg.log_backups,
        memory_check_interval=cfg.memory_check_interval,
        keys_dir=keys_dir,
        max_frame=cfg.max_frame,
        death_signal=cfg.death_signal,
    )


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


def _agent_specs(
    v: _Validator, defined: dict[str, _Defined], daemon: DaemonSpec
) -> tuple[dict[str, AgentSpec], dict[str, list[str]]]:
    """Agent specs by instance name, and each agent's instance names."""
    import sys

    specs: dict[str, AgentSpec] = {}
    instances: dict[str, list[str]] = {}
    for name, entry in defined.items():
        if entry.kind != "agent":
            continue
        cfg: AgentConfig = entry.config
        src = entry.source
        path = ("agents", name)
        base = Path(src.path).resolve().parent

        def sub(value: str) -> str:
            return value.replace("{runtime_dir}", daemon.runtime_dir)

        if (cfg.module is None) == (cfg.command is None):
            v.issue(src, path, f"agents.{name}: set exactly one of `module` or `command`")
            continue
        if cfg.module is not None:
            if not MODULE_RE.match(cfg.module):
                v.issue(src, (*path, "module"), f"agents.{name}.module: expected 'pkg.mod:Class'")
                continue
            argv: tuple[str, ...] = (sys.executable, "-m", "agentd.agents", cfg.module)
        else:
            if not cfg.command:
                v.issue(src, (*path, "command"), f"agents.{name}.command: must not be empty")
                continue
            argv = tuple(sub(a) for a in cfg.command)
        stop_signal = _signal_number(cfg.stop_signal)
        if stop_signal is None:
            v.issue(src, (*path, "stop_signal"), f"agents.{name}.stop_signal: unknown signal")
            continue
        checks = (
            ("shutdown", isinstance(cfg.shutdown, float) and cfg.shutdown < 0, "must be >= 0"),
            ("heartbeat", cfg.heartbeat <= 0, "must be > 0"),
            ("start_seconds", cfg.start_seconds < 0, "must be >= 0"),
            ("restart_delay", cfg.restart_delay < 0, "must be >= 0"),
            ("replicas", cfg.replicas is not None and cfg.replicas < 0, "must be >= 0"),
        )
        bad = [(key, why) for key, failed, why in checks if failed]
        for key, why in bad:
            v.issue(src, (*path, key), f"agents.{name}.{key}: {why}")
        bad += _delivery_issues(v, src, path, name, cfg)
        for key, value in (
            ("memory_mb", cfg.limits.memory_mb),
            ("nofile", cfg.limits.nofile),
            ("cpu_seconds", cfg.limits.cpu_seconds),
        ):
            if value < 0:
                v.issue(src, (*path, "limits", key), f"agents.{name}.limits.{key}: must be >= 0")
                bad.append((key, ""))
        if cfg.user is not None and not _user_exists(cfg.user):
            v.issue(src, (*path, "user"), f"agents.{name}.user: no such user `{cfg.user}`")
            bad.append(("user", ""))
        if cfg.group is not None and not _group_exists(cfg.group):
            v.issue(src, (*path, "group"), f"agents.{name}.group: no such group `{cfg.group}`")
            bad.append(("group", ""))
        if bad:
            continue
        cwd = sub(cfg.cwd) if cfg.cwd else None
        if cwd and not os.path.isabs(cwd):
            cwd = str(base / cwd)
        common = dict(
            argv=argv,
            bus_agent=cfg.module is not None,
            restart=cfg.restart,
            shutdown=None if cfg.shutdown == "brutal_kill" else float(cfg.shutdown),
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
            limits=cfg.limits,
            max_deliveries=cfg.max_deliveries,
            retry_backoff=cfg.retry_backoff,
            max_in_flight=cfg.max_in_flight,
            max_pending=cfg.max_pending,
        )
        if cfg.replicas is None:
            names = [name]
            specs[name] = AgentSpec(name=name, pool=None, **common)
        else:
            names = [pool_member(name, i) for i in range(cfg.replicas)]
            for member in names:
                specs[member] = AgentSpec(name=member, pool=name, **common)
        instances[name] = names
    return specs, instances


def _delivery_issues(
    v: _Validator, src: _Source, path: tuple[str, ...], name: str, cfg: AgentConfig
) -> list[tuple[str, str]]:
    """Bounds of the durable delivery keys: each one out of range is an issue."""
    bad: list[tuple[str, str]] = []
    for key, lowest, highest in DELIVERY_BOUNDS:
        value = getattr(cfg, key)
        if not lowest <= value <= highest:
            bad.append((key, f"must be between {lowest} and {highest}"))
    if not 0 < cfg.retry_backoff <= RETRY_BACKOFF_MAX:
        bad.append(("retry_backoff", f"must be > 0 and <= {RETRY_BACKOFF_MAX:g} (seconds)"))
    for key, why in bad:
        v.issue(src, (*path, key), f"agents.{name}.{key}: {why}")
    return bad


def member_spec(template: AgentSpec, pool: str, index: int) -> AgentSpec:
    """A new pool member shaped like an existing one (used by `scale`)."""
    return msgspec.structs.replace(template, name=pool_member(pool, index), pool=pool)


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


def _supervisor_specs(
    v: _Validator,
    defined: dict[str, _Defined],
    root_cfg: SupervisorConfig,
    main: _Source,
    instances: dict[str, list[str]],
) -> dict[str, SupervisorSpec]:
    """Supervisor specs with children expanded to instance names; checks references."""
    configs: dict[str, tuple[SupervisorConfig, _Source, tuple[str, ...]]] = {
        name: (entry.config, entry.source, ("supervisors", name))
        for name, entry in defined.items()
        if entry.kind == "supervisor"
    }
    claimed: dict[str, str] = {}  # child -> the supervisor that lists it
    for sup_name, (cfg, src, path) in [
        (ROOT, (root_cfg, main, ("supervisor",))),
        *configs.items(),
    ]:
        for child in cfg.children or []:
            where = (*path, "children")
            if child not in defined:
                v.issue(src, where, f"{'.'.join(path)}.children: unknown child `{child}`")
            elif child in claimed:
                v.issue(
                    src,
                    where,
                    f"{'.'.join(path)}.children: `{child}` is already a child of "
                    f"`{claimed[child]}`",
                )
            else:
                claimed[child] = sup_name
    if root_cfg.children is None:
        root_children = [name for name in defined if name not in claimed]
    else:
        root_children = list(root_cfg.children)
    for name in root_children:
        claimed.setdefault(name, ROOT)
    for name, entry in defined.items():
        if name not in claimed:
            path = ("agents" if entry.kind == "agent" else "supervisors", name)
            v.issue(entry.source, path, f"`{name}` is not a child of any supervisor")
    _check_cycles(v, configs)

    def expand(children: list[str]) -> tuple[str, ...]:
        out: list[str] = []
        for child in children:
            out.extend(instances.get(child, [child]))
        return tuple(out)

    specs = {
        ROOT: SupervisorSpec(
            name=ROOT,
            strategy=root_cfg.strategy,
            max_restarts=root_cfg.max_restarts,
            max_seconds=root_cfg.max_seconds,
            restart="permanent",
            children=expand(root_children),
        )
    }
    for name, (cfg, src, path) in configs.items():
        if cfg.max_restarts < 0 or cfg.max_seconds <= 0:
            v.issue(src, path, f"supervisors.{name}: max_restarts >= 0 and max_seconds > 0")
        specs[name] = SupervisorSpec(
            name=name,
            strategy=cfg.strategy,
            max_restarts=cfg.max_restarts,
            max_seconds=cfg.max_seconds,
            restart=cfg.restart,
            children=expand(cfg.children or []),
        )
    if root_cfg.max_restarts < 0 or root_cfg.max_seconds <= 0:
        v.issue(main, ("supervisor",), "supervisor: max_restarts >= 0 and max_seconds > 0")
    return specs


def _check_cycles(
    v: _Validator, configs: dict[str, tuple[SupervisorConfig, _Source, tuple[str, ...]]]
) -> None:
    """A supervisor that (transitively) contains itself is an error."""
    for start, (_cfg, src, path) in configs.items():
        stack = list(configs[start][0].children or [])
        seen: set[str] = set()
        while stack:
            child = stack.pop()
            if child == start:
                v.issue(src, (*path, "children"), f"supervisors.{start}: cycle through `{start}`")
                break
            if child in seen or child not in configs:
                continue
            seen.add(child)
            stack.extend(configs[child][0].children or [])
