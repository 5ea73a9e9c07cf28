"""The hub's audit trail: every published `job.*` signal, one JSON line each.

Pub/sub doing real work: nobody sends to this agent; it subscribes to
`job.*` (the `@on` route; put the same pattern in the config's `subscribe`
so the broker also holds job signals for it while it restarts) and appends

    {"signal": <id>, "type": "job.completed", "source": "orchestrator",
     "time": <unix seconds>, "redelivered": false, "data": {...}}

to the file named by `AUDIT_FILE` — in the bundled configs
`{runtime_dir}/audit.jsonl`, next to the daemon's sockets; without the
variable, `audit.jsonl` in the agent's working directory. Each line is one
`write()` on a file opened with O_APPEND, so lines never interleave, and
with `ack = true` a signal counts as handled only once its line is written:
a crash between the two means the line may appear twice (at least once,
never lost), never that it is missing.
"""

from __future__ import annotations

import os

import msgspec

from agentd.agents import Agent, Context, Signal, on
from agentd.daemon.log import get_logger


class Audit(Agent):
    """Appends each `job.*` signal to the audit file."""

    def setup(self) -> None:
        self.path = os.path.abspath(os.environ.get("AUDIT_FILE", "audit.jsonl"))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.encode = msgspec.json.Encoder().encode
        get_logger("agentd.audit").info("audit.file", agent=self.name, path=self.path)

    def teardown(self) -> None:
        os.close(self.fd)

    @on("job.*")
    def record(self, signal: Signal, ctx: Context) -> None:
        """A plain `def`: a local append is quick, and the SDK acks after it returns."""
        line = {
            "signal": signal.id,
            "type": signal.type,
            "source": signal.source,
            "time": signal.time,
            "redelivered": signal.redelivered,
            "data": signal.data,
        }
        os.write(self.fd, self.encode(line) + b"\n")
