"""The validated spec: what the config means, with every default applied.

Config files are parsed into loose shapes (config.py); this module holds the
strict result that everything downstream consumes. The supervision tree and
the process runtime never look at TOML, only at these frozen structures, so a
reload can compare old and new specs field by field.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .events import HISTORY

#: `dynamic`: no configured children; they are spawned at run time from `template` and
#: restarted one for one (OTP's simple_one_for_one; SPEC §12).
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one", "dynamic"]
RestartType = Literal["permanent", "transient", "temporary"]
AutoShutdown = Literal["never", "any_significant", "all_significant"]
JournalSync = Literal["batch", "always"]
StartMode = Literal["fork", "exec"]
CgroupMode = Literal["auto", "required", "off"]

#: Names an agent may not take: the broker, the daemon's bus identity, ctl.
RESERVED_NAMES = frozenset({"bus", "agentd", "ctl"})


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-agent resource limits; 0 means unlimited.

    With a cgroup (SPEC §11) the kernel keeps memory_mb (memory.max), pids (pids.max)
    and cpu_percent (a CPU quota, 100 = one core); without one memory_mb is sampled
    and pids and cpu_percent are not enforced (the daemon says so at start).
    """

    memory_mb: int = 0
    nofile: int = 0
    cpu_seconds: int = 0
    pids: int = 0
    cpu_percent: int = 0


class AgentSpec(msgspec.Struct, frozen=True):
    """One agent instance as the runtime starts it (a pool member is one of these)."""

    name: str  # instance name: "worker@2" for a pool member, else the agent name
    pool: str | None  # the pool's name for a member, else None
    argv: tuple[str, ...]
    bus_agent: bool  # an SDK agent: started = READY on the bus
    module: str | None = None  # "pkg.mod:Class" of an SDK agent (argv runs it in exec mode)
    start: StartMode = "exec"  # fork: from a warm template (SPEC §12); module agents only
    restart: RestartType = "permanent"
    shutdown: float | None = 5.0  # None = brutal_kill; math.inf = infinity (no SIGKILL)
    stop_signal: int = 15
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: str | None = None
    group: str | None = None
    subscribe: tuple[str, ...] = ()
    heartbeat: float = 10.0
    start_seconds: float = 1.0
    ack: bool = False
    restart_delay: float = 0.0
    significant: bool = False  # its own end may end its supervisor (auto_shutdown, SPEC §4)
    # Its memory may be merged with identical pages of other processes by the kernel's
    # KSM (PR_SET_MEMORY_MERGE, systemd's MemoryKSM=): forked agents' copy-on-write
    # copies of their template's pages are mostly alike. Fork mode only.
    memory_ksm: bool = False
    # stderr into the stdout pipe (supervisord's redirect_stderr): one pipe, so one fd
    # in the daemon per agent instead of two; the exit's stderr_tail is then both streams.
    redirect_stderr: bool = False
    limits: Limits = Limits()
    # Durable delivery (SPEC §10), passed to the broker in the agent table; they only
    # change anything for an ack = true agent.
    max_deliveries: int = 5  # failed deliveries before the dead-letter queue
    retry_backoff: float = 0.5  # seconds before a failed delivery is retried (doubling)
    max_in_flight: int = 100  # handed to the agent and not yet acknowledged, at most
    max_pending: int = 10_000  # kept by the broker for the agent, at most
    # A dynamic child's spawn args as JSON text: AGENTD_ARGS (spawn.agent_env). A field of
    # its own, not in `env`: children of one template differ only in name and args.
    args: str | None = None


class SupervisorSpec(msgspec.Struct, frozen=True):
    """A supervisor: its strategy, intensity and ordered children (instance names)."""

    name: str
    strategy: Strategy = "one_for_one"
    max_restarts: int = 3
    max_seconds: float = 5.0
    restart: RestartType = "permanent"
    children: tuple[str, ...] = ()
    auto_shutdown: AutoShutdown = "never"  # OTP 24: end when significant children have ended
    significant: bool = False  # as a child of its parent
    template: str | None = None  # dynamic: the agent (in Spec.templates) children are made from
    max_children: int = 1000  # dynamic: children at most (a spawn past it is refused)


class DaemonSpec(msgspec.Struct, frozen=True):
    """Daemon-wide settings with `{runtime_dir}` already substituted."""

    runtime_dir: str
    log_dir: str
    control: str
    bus: str
    state_dir: str  # durable state (the bus journal); never under runtime_dir
    journal_sync: JournalSync = "batch"  # always: fsync before each receipt
    shutdown_timeout: float = 30.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    memory_check_interval: float = 2.0
    keys_dir: str | None = None
    max_frame: int = 1024 * 1024
    death_signal: bool = True  # PR_SET_PDEATHSIG via an exec trampoline (spawn.py)
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint; None = off (SPEC §13)
    metrics_tls_cert: str | None = None  # PEM files (absolute): HTTPS; required off loopback
    metrics_tls_key: str | None = None
    event_history: int = HISTORY  # events kept for `ctl events --since`
    cgroup: CgroupMode = "auto"  # a cgroup per agent (cgroup.py); auto: where the host allows
    cgroup_root: str | None = None  # the parent of agentd's cgroup subtree (default: chosen)


class PoolSpec(msgspec.Struct, frozen=True):
    """A pool as configured: scale changes `replicas`, the template stays."""

    name: str
    replicas: int
    supervisor: str


class Spec(msgspec.Struct, frozen=True):
    """The whole validated configuration."""

    daemon: DaemonSpec
    root: str  # name of the root supervisor ("root")
    supervisors: dict[str, SupervisorSpec]
    agents: dict[str, AgentSpec]  # by instance name
    pools: dict[str, PoolSpec]
    files: tuple[str, ...] = ()  # the files it was read from, main first
    # Agents named as a dynamic supervisor's `template`: never started on their own, the
    # pattern of each child spawned (daemon/dynamic.py). Not in `agents`.
    templates: dict[str, AgentSpec] = {}

    def parent_of(self, name: str) -> str | None:
        """The supervisor that has `name` among its children, if any."""
        for sup in self.supervisors.values():
            if name in sup.children:
                return sup.name
        return None


ROOT = "root"


def pool_member(pool: str, index: int) -> str:
    """Instance name of a pool member: NAME@INDEX, as in the contract."""
    return f"{pool}@{index}"


def member_spec(template: AgentSpec, pool: str, index: int) -> AgentSpec:
    """Pool member `index`, shaped like `template` (a member, or the pool's agent)."""
    return msgspec.structs.replace(template, name=pool_member(pool, index), pool=pool)
