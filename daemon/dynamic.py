"""Dynamic supervisors: children spawned at run time from a template, and their record.

A supervisor with `strategy = "dynamic"` starts empty (SPEC §12). `spawn` makes an
agent spec from the supervisor's `template` (the child's name, its `args` as
`AGENTD_ARGS` in its environment) and adds it to the running spec and the tree exactly as
`ctl scale` adds a pool member; `terminate` removes it. The tree restarts dynamic
children one for one (tree.py treats `dynamic` as OTP's simple_one_for_one).

Permanent and transient children are written to `<state_dir>/dynamic.json`
before a spawn is answered, so that a daemon started again — after a stop or a
`kill -9` — spawns them again with the same names and args. The record is the
whole list, rewritten atomically (tmp, fsync, rename, fsync of the directory) on
every change; it is bounded by RECORD_MAX.

`ctl spawn`/`terminate` and the bus's `spawn`/`terminate` frames both come here:
`Dynamic.spawn` and `Dynamic.terminate` are the one implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from agentd.bus.atomic import replace_durably
from agentd.bus.log import get_logger

from .spec import RESERVED_NAMES, ROOT, AgentSpec, Spec

if TYPE_CHECKING:
    from .driver import Driver

RECORD = "dynamic.json"  # in state_dir
ARGS_MAX = 64 * 1024  # bytes of JSON args per child
RECORD_MAX = 64 * 2**20  # bytes of the whole record: a spawn that would pass it is refused
NAME_MAX = 128  # as config.py's tree.name_length: a routing id and a log file name must fit
_DAY = 86_400.0  # a restored child waits its turn in the tree's start, however long
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # as config.py's: no `@` (pool members)


class SpawnError(Exception):
    """A spawn or terminate that cannot be done; the message is for the caller."""


class Child(msgspec.Struct, frozen=True):
    """One dynamic child as recorded: enough to spawn it again."""

    name: str
    supervisor: str
    args: str | None = None  # JSON text, exactly as AGENTD_ARGS carries it


class RecordFile(msgspec.Struct):
    version: int = 1
    children: list[Child] = []


# --- pure parts ---------------------------------------------------------------------


def encode_args(args: Any) -> str | None:
    """`args` as compact JSON text (None stays None); SpawnError if not JSON or too large."""
    if args is None:
        return None
    try:
        text = json.dumps(args, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise SpawnError(f"args must be a JSON value: {exc}") from None
    size = len(text.encode())
    if size > ARGS_MAX:
        raise SpawnError(f"args are {size} bytes of JSON, more than the {ARGS_MAX} allowed")
    return text


def child_spec(template: AgentSpec, name: str, args: str | None) -> AgentSpec:
    """The child's agent spec: the template's, under its own name, with its args."""
    return msgspec.structs.replace(template, name=name, pool=None, args=args)


def name_problem(spec: Spec, name: Any) -> str | None:
    """Why `name` cannot be a new child's (None if it can): invalid, reserved or taken."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        return f"bad name `{name}`: use letters, digits, `_` and `-`, starting with a letter"
    if len(name) > NAME_MAX:
        return f"bad name: {len(name)} characters, more than the {NAME_MAX} allowed"
    if name in RESERVED_NAMES or name == ROOT:
        return f"`{name}` is a reserved name"
    if name in spec.agents or name in spec.supervisors or name in spec.pools:
        return f"the name `{name}` is taken"
    if name in spec.templates:
        return f"the name `{name}` is taken (by a template)"
    return None


def with_children(spec: Spec, children: Iterable[Child]) -> tuple[Spec, list[Child]]:
    """`spec` with these dynamic children in it, each made from its supervisor's template now.

    Used on reload, with the running children: a child whose supervisor is gone or
    no longer dynamic, or whose name a configured agent now has, is left out. The
    second value is the children kept.
    """
    agents = dict(spec.agents)
    supervisors = dict(spec.supervisors)
    kept: list[Child] = []
    for child in children:
        sup = supervisors.get(child.supervisor)
        if sup is None or sup.strategy != "dynamic" or sup.template not in spec.templates:
            continue
        if child.name in agents or child.name in supervisors or name_problem(spec, child.name):
            continue
        agents[child.name] = child_spec(spec.templates[sup.template], child.name, child.args)
        supervisors[sup.name] = msgspec.structs.replace(sup, children=(*sup.children, child.name))
        kept.append(child)
    return msgspec.structs.replace(spec, agents=agents, supervisors=supervisors), kept


# --- the record -------------------------------------------------------------------


class Record:
    """`<state_dir>/dynamic.json`: the children to spawn again when the daemon starts."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / RECORD
        self.log = get_logger("agentd.dynamic")

    def load(self) -> list[Child]:
        """The recorded children; a missing file is none, a bad one is set aside and logged."""
        try:
            if self.path.stat().st_size > RECORD_MAX:
                raise ValueError(f"larger than {RECORD_MAX} bytes")
            return msgspec.json.decode(self.path.read_bytes(), type=RecordFile).children
        except FileNotFoundError:
            return []
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            bad = self.path.with_name(RECORD + ".bad")
            with contextlib.suppress(OSError):
                os.replace(self.path, bad)
            self.log.error("dynamic.record_unreadable", path=str(self.path), error=str(exc))
            return []

    def save(self, children: Iterable[Child]) -> None:
        """Write the whole list atomically; SpawnError if it would pass RECORD_MAX."""
        data = msgspec.json.encode(RecordFile(children=list(children)))
        if len(data) > RECORD_MAX:
            raise SpawnError(f"the record of dynamic children would pass {RECORD_MAX} bytes")
        try:
            replace_durably(self.path, data)
        except OSError as exc:
            raise SpawnError(f"cannot record the dynamic children in {self.path}: {exc}") from None


# --- the driver ---------------------------------------------------------------------


class Dynamic:
    """The daemon's dynamic children: spawn, terminate, forget, record."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.record = Record(driver.spec.daemon.state_dir)
        self.children: dict[str, Child] = {}  # every live dynamic child, temporary ones too
        self.log = get_logger("agentd.dynamic")

    def restore(self) -> list[str]:
        """At start, before the tree starts: the recorded children back in, started with it.

        Each goes through the same checks as a spawn; one that no longer fits (its
        supervisor gone or not dynamic, its name now a configured agent's) is left
        out, and the record rewritten. `settle` then waits for each to run.
        """
        names = []
        for child in self.record.load():
            try:
                self._begin(child.supervisor, child.name, child.args, restoring=True)
            except SpawnError as exc:
                self.log.warning("dynamic.not_restored", name=child.name, reason=str(exc))
            else:
                names.append(child.name)
        self.save_quietly()
        if names:
            self.log.info("dynamic.restored", children=len(names))
        return names

    async def settle(self, names: list[str]) -> None:
        """Restored children that cannot start any more are dropped, as a spawn would be.

        (They would otherwise crash-loop until their supervisor, and maybe agentd,
        gives up: a spawn's promise is to run what ran, not to take the tree down.)
        """

        async def one(name: str) -> None:
            try:
                await self._settle(name, {name: 0}, timeout=_DAY)
            except SpawnError as exc:
                self.driver.events.emit("agent.spawn_failed", name, reason=str(exc))

        await asyncio.gather(*(one(n) for n in names))

    def carry(self, new: Spec) -> Spec:
        """Reload: `new` with the running children kept, made from the (new) template.

        A child whose template changed is a changed agent to reload's diff, so it
        restarts with the new template; one whose supervisor is gone or no longer
        dynamic is not in the result, so reload stops it.
        """
        spec, kept = with_children(new, self.children.values())
        self.children = {c.name: c for c in kept}
        return spec

    def save(self) -> None:
        """Record the permanent and transient children (temporary ones never come back)."""
        spec = self.driver.spec
        self.record.save(
            c
            for c in self.children.values()
            if c.name in spec.agents and spec.agents[c.name].restart != "temporary"
        )

    async def spawn(self, supervisor: Any, name: Any, args: Any = None) -> dict[str, Any]:
        """Start child `name` of dynamic `supervisor`; returns once it runs (SpawnError if not)."""
        d = self.driver
        exits = {name: d.exits.get(name, 0)} if isinstance(name, str) else {}
        self._begin(supervisor, name, encode_args(args))
        await self._settle(name, exits, timeout=d.start_timeout([name]))
        d.events.emit("agent.spawned", name, supervisor=supervisor)
        proc = d.runtime.procs.get(name) if d.runtime else None
        return {"spawned": name, "supervisor": supervisor, "pid": proc.pid if proc else None}

    def _begin(self, supervisor: Any, name: Any, args: str | None, restoring: bool = False) -> None:
        """Checked, recorded (before any answer: a spawn's OK is a promise), in the tree."""
        d = self.driver
        agent = self._check(supervisor, name, args, restoring)
        self.children[name] = Child(name, supervisor, args)
        self._put(supervisor, agent)
        if not restoring and agent.restart != "temporary":
            try:
                self.save()
            except SpawnError:
                self.children.pop(name)
                self._unput(name)
                raise
        d.add(supervisor, name, agent)

    async def _settle(self, name: str, exits: dict[str, int], timeout: float) -> None:
        """Wait until `name` runs; if it ends or times out first, remove it (SpawnError)."""
        failed = await self.driver.await_running([name], exits, timeout=timeout)
        if not failed:
            return
        if self.driver.stopping:  # stopped by the shutdown: still recorded, back next start
            raise SpawnError("agentd is stopping")
        why = self._why(name)
        if name in self.children:
            await self._remove(name)
        raise SpawnError(f"`{name}` did not start{why}")

    async def terminate(self, name: Any) -> dict[str, Any]:
        """Stop dynamic child `name` for good; returns once it is gone."""
        if not isinstance(name, str) or name not in self.children:
            if isinstance(name, str) and name in self.driver.view:
                raise SpawnError(
                    f"`{name}` is not a dynamic child (`ctl stop` stops a configured agent)"
                )
            raise SpawnError(f"unknown agent `{name}`")
        await self._remove(name)
        self.driver.events.emit("agent.terminated", name)
        return {"terminated": name}

    def sweep(self, name: str) -> None:
        """After `name`'s exit: forget it if it ended for good (temporary, or transient
        with a normal end).

        OTP deletes such a child of a simple_one_for_one supervisor; here it also
        leaves the record (it will not come back) and frees its name. Only the child
        that exited can have ended (a child's `ended` is set by its own exit; reload's
        `carry` drops the children of a removed supervisor), so one lookup, not a scan
        of every child on every exit.
        """
        if name not in self.children:
            return
        view = self.driver.view
        if name in view:
            if not view.finished(name):
                return
            self.driver.remove(name)
        self.children.pop(name, None)
        self._unput(name)
        self.save_quietly()

    # --- internals ----------------------------------------------------------------

    def _check(
        self, supervisor: Any, name: Any, args: str | None, restoring: bool = False
    ) -> AgentSpec:
        """The new child's spec, or SpawnError saying why it cannot be spawned.

        A restored child is not refused for max_children (lowered since): as on a
        reload, the children there are keep running and new spawns wait for room.
        """
        d = self.driver
        spec = d.spec
        sup = spec.supervisors.get(supervisor) if isinstance(supervisor, str) else None
        if sup is None:
            raise SpawnError(f"unknown supervisor `{supervisor}`")
        if sup.strategy != "dynamic" or sup.template not in spec.templates:
            raise SpawnError(
                f'`{supervisor}` is not a dynamic supervisor (strategy = "{sup.strategy}")'
            )
        problem = name_problem(spec, name)
        if problem is None and name in d.view:
            problem = f"the name `{name}` is taken"
        if problem:
            raise SpawnError(problem)
        if len(sup.children) >= sup.max_children and not restoring:
            raise SpawnError(
                f"`{supervisor}` has {len(sup.children)} children: its max_children "
                f"({sup.max_children}) is reached"
            )
        if d.stopping:
            raise SpawnError("agentd is stopping")
        phase = d.view.supervisor(supervisor).phase
        # Idle before the tree is up: its turn to start has not come yet (the child
        # starts with it). Idle after: stopped (ctl stop), and so is anything else.
        if phase not in ("starting", "running") and (phase != "idle" or d.ready):
            raise SpawnError(f"supervisor `{supervisor}` is not running ({phase})")
        return child_spec(spec.templates[sup.template], name, args)

    def _put(self, supervisor: str, agent: AgentSpec) -> None:
        """Into the running spec, the runtime's and the broker's tables (not yet the tree)."""
        d = self.driver
        sup = d.spec.supervisors[supervisor]
        agents = {**d.spec.agents, agent.name: agent}
        supervisors = {
            **d.spec.supervisors,
            supervisor: msgspec.structs.replace(sup, children=(*sup.children, agent.name)),
        }
        d.set_spec(
            msgspec.structs.replace(d.spec, agents=agents, supervisors=supervisors), [agent.name]
        )

    def _unput(self, name: str) -> None:
        """Out of the running spec and the tables; its log file closed."""
        d = self.driver
        agents = dict(d.spec.agents)
        if agents.pop(name, None) is None:
            return
        supervisors = dict(d.spec.supervisors)
        for key, s in d.spec.supervisors.items():
            if name in s.children:
                i = s.children.index(name)
                kept = s.children[:i] + s.children[i + 1 :]
                supervisors[key] = msgspec.structs.replace(s, children=kept)
        d.set_spec(msgspec.structs.replace(d.spec, agents=agents, supervisors=supervisors), [name])
        runtime = d.runtime
        if runtime is not None and name not in runtime.procs:
            runtime.last_exit.pop(name, None)  # a new child of this name starts afresh
            log = runtime.logs.pop(name, None)
            if log is not None:
                log.close()

    async def _remove(self, name: str) -> None:
        """Out of the record first (a crash now must not bring it back), then stopped."""
        d = self.driver
        self.children.pop(name, None)
        self.save_quietly()
        if name in d.view:
            d.remove(name)
            await d.wait_until(lambda: name not in d.view, d.stop_timeout([name]))
        self._unput(name)

    def save_quietly(self) -> None:
        try:
            self.save()
        except SpawnError as exc:
            self.log.error("dynamic.record_failed", error=str(exc))

    def _why(self, name: str) -> str:
        runtime = self.driver.runtime
        last = runtime.last_exit.get(name) if runtime is not None else None
        if last is None:
            return ""
        what = f"signal {last.signal}" if last.signal else f"code {last.code}"
        tail = f"; stderr: {last.stderr_tail[-1]}" if last.stderr_tail else ""
        return f" ({last.reason}, {what}{tail})"
