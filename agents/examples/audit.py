"""The hub's audit trail: every published `job.*` signal, one JSON line each.

Pub/sub doing real work: nobody sends to this agent; it subscribes to
`job.*` (the `@on` route; put the same pattern in the config's `subscribe`
so the broker also keeps job signals for it while it restarts) and appends

    {"signal": <id>, "type": "job.completed", "source": "orchestrator",
     "time": <unix seconds>, "redelivered": false, "data": {...}}

to `hub/audit.jsonl` in the daemon's state dir (`$AGENTD_STATE_DIR`, with
the hub's SQLite stores: durable across restarts and reboots, where the
runtime dir is a tmpfs that systemd empties on every restart), or to the
file named by `AUDIT_FILE` if set. Run outside agentd (no
AGENTD_STATE_DIR), `audit.jsonl` in the working directory.

Exactly once. With `ack = true` a signal counts as handled only once its
line is written, so nothing is lost; what can come twice is a signal
redelivered after a crash between the write and the ack, or an outcome
the orchestrator published again (it does that for a job it sees again
after recording it). So the trail is deduplicated: one line per job
outcome (`job.completed` / `job.failed`, by type and `data.id`) and per
signal id for any other `job.*` type. The file itself is the record of
what was written — read back at start — because a second store could not
be written in the same step as the line. Each line is one `write()` on a
file opened with O_APPEND, so lines never interleave. A line torn by a
`kill -9` in the middle of its write (a line longer than a page) or by a
power loss is ended with a newline at the next start and skipped, and its
signal, never acknowledged, is written again when it comes back. The
newest `AUDIT_REMEMBER` keys (default 1,000,000) are kept for the check.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec

from agentd.agents import Agent, Context, Signal, on
from agentd.bus.log import get_logger

OUTCOMES = ("job.completed", "job.failed")


class Line(msgspec.Struct):
    """The fields of a trail line that make up its key."""

    signal: str
    type: str
    data: Any = None


def key(signal_id: str, signal_type: str, data: Any) -> str:
    """What makes a line a duplicate: the job, for an outcome; the signal, otherwise."""
    if signal_type in OUTCOMES and isinstance(data, dict) and "id" in data:
        return f"{signal_type} {data['id']}"
    return f"signal {signal_id}"


def trail_path(env: Mapping[str, str]) -> str:
    """$AUDIT_FILE, else the state dir's hub/audit.jsonl, else ./audit.jsonl (absolute)."""
    if env.get("AUDIT_FILE"):
        return os.path.abspath(env["AUDIT_FILE"])
    if env.get("AGENTD_STATE_DIR"):
        return os.path.join(os.path.abspath(env["AGENTD_STATE_DIR"]), "hub", "audit.jsonl")
    return os.path.abspath("audit.jsonl")


class Audit(Agent):
    """Appends each `job.*` signal to the audit file, once."""

    def setup(self) -> None:
        self.path = trail_path(os.environ)
        self.remember = int(os.environ.get("AUDIT_REMEMBER", "1000000"))
        self.log = get_logger("agentd.audit").bind(agent=self.name)
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        self._read_back()
        self.encode = msgspec.json.Encoder().encode
        self.log.info("audit.file", path=self.path, lines=len(self.seen))

    def teardown(self) -> None:
        os.close(self.fd)

    def _read_back(self) -> None:
        """The keys of the lines already written (by earlier incarnations)."""
        decode = msgspec.json.Decoder(Line).decode
        with open(self.path, "rb") as f:
            content = f.read()
        for raw in content.splitlines():
            try:
                line = decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.log.warning("audit.bad_line", line=raw[:200].decode(errors="replace"))
                continue
            self._remember(key(line.signal, line.type, line.data))
        if content and not content.endswith(b"\n"):  # a torn write: end it
            os.write(self.fd, b"\n")

    def _remember(self, k: str) -> None:
        self.seen[k] = None
        if len(self.seen) > self.remember:
            self.seen.popitem(last=False)

    @on("job.*")
    def record(self, signal: Signal, ctx: Context) -> None:
        """A plain `def`: a local append is quick, and the SDK acks after it returns."""
        k = key(signal.id, signal.type, signal.data)
        if k in self.seen:
            self.log.info("audit.duplicate", key=k, redelivered=signal.redelivered)
            return
        line = {
            "signal": signal.id,
            "type": signal.type,
            "source": signal.source,
            "time": signal.time,
            "redelivered": signal.redelivered,
            "data": signal.data,
        }
        os.write(self.fd, self.encode(line) + b"\n")
        self._remember(k)
