"""The hub's orchestrator: jobs in, tasks out to the worker pools, one outcome per job.

    ingress --job.submit--> orchestrator --task.text.* request--> pool `text`
                                         --task.math.* request--> pool `math`
            <--job.completed / job.failed (published)--

A job arrives as a direct signal `job.submit` with data `{"id", "type",
"payload"}`. The orchestrator splits it (`jobs.split`), sends every task
as a *request* to the pool named `Task.pool` — the broker picks a member —
gathers the replies, joins them (`jobs.join`) and publishes the outcome:
`job.completed` `{"id", "type", "result"}` or `job.failed` `{"id", "type",
"error"}`. The ingress, the audit agent and anybody else subscribed hear it.

Failure handling, from the inside out:
- a worker that dies mid-task: the broker moves the unacknowledged task to
  another member of the pool (`ack = true` on the workers), and its reply
  still answers our original request — nothing to do here;
- a request that times out or that the broker refuses: retried, up to
  `ORCHESTRATOR_ATTEMPTS` times (default 4), each waiting
  `ORCHESTRATOR_TASK_TIMEOUT` seconds (default 10);
- a worker that *answers* with an error (it looked at the task and said
  no): final, the job fails — asking again would get the same answer;
- this process, the broker or the daemon dying: the orchestrator is
  `ack = true`, so `job.submit` is the broker's (journaled) until the
  job's handler returns, and whatever was in flight is delivered again,
  flagged `redelivered`.

Exactly once, over all of that: each job's outcome is committed to
`$AGENTD_STATE_DIR/hub/orchestrator.db` (SQLite, see `store`) *before* it
is published and before the submit is acknowledged. A submit for a job
whose outcome is recorded — a redelivery after a crash between the commit
and the ack, or the ingress sending a job again — does not run the job: it
publishes the recorded outcome once more, for a subscriber that may have
missed it. Subscribers therefore see an outcome at least once and must
keep the first (the ingress and the audit agent do, by job id). A submit
for a job this process is running already is acknowledged and ignored: the
first one's ack is still due. The newest `ORCHESTRATOR_REMEMBER` outcomes
(default 100,000) are kept.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import msgspec

from agentd.agents import Agent, BusError, BusTimeout, Context, RemoteError, Signal, on
from agentd.bus.log import get_logger

from .jobs import JobError, Task, join, split
from .store import HubDb

SCHEMA = """CREATE TABLE IF NOT EXISTS outcomes (
    seq INTEGER PRIMARY KEY,   -- finishing order, for pruning the oldest
    id TEXT NOT NULL UNIQUE,   -- the job id
    outcome BLOB NOT NULL,     -- JSON: {"id", "type", "status", "result" | "error"}
    finished REAL NOT NULL
)"""


class Outcomes:
    """Finished jobs; `record` has committed when it returns."""

    def __init__(self, db: HubDb, remember: int = 100_000) -> None:
        self.db = db
        self.remember = remember
        with db.tx() as c:
            c.execute(SCHEMA)
            c.execute(
                "DELETE FROM outcomes WHERE seq <= (SELECT max(seq) FROM outcomes) - ?",
                (remember,),
            )

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.conn.execute(
            "SELECT outcome FROM outcomes WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None else msgspec.json.decode(row[0])

    def record(self, outcome: dict[str, Any]) -> None:
        with self.db.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO outcomes (id, outcome, finished) VALUES (?, ?, ?)",
                (outcome["id"], msgspec.json.encode(outcome), time.time()),
            )
            c.execute("DELETE FROM outcomes WHERE seq <= last_insert_rowid() - ?", (self.remember,))


class Orchestrator(Agent):
    """Split, route, retry, join; record, publish."""

    def setup(self) -> None:
        self.attempts = max(1, int(os.environ.get("ORCHESTRATOR_ATTEMPTS", "4")))
        self.timeout = float(os.environ.get("ORCHESTRATOR_TASK_TIMEOUT", "10"))
        self.log = get_logger("agentd.orchestrator").bind(agent=self.name)
        self.db = HubDb("orchestrator.db", self.log)
        self.outcomes = Outcomes(self.db, int(os.environ.get("ORCHESTRATOR_REMEMBER", "100000")))
        self.running: set[str] = set()

    def teardown(self) -> None:
        self.db.close()

    @on("job.submit")
    async def submit(self, signal: Signal, ctx: Context) -> dict[str, Any]:
        """Run one job to its outcome (the reply, if the submit was a request)."""
        job = signal.data if isinstance(signal.data, dict) else {}
        job_id = str(job.get("id", signal.id))
        if job_id in self.running:
            self.log.info("job.duplicate", job=job_id, redelivered=signal.redelivered)
            return {"id": job_id, "status": "pending"}
        recorded = self.outcomes.get(job_id)
        if recorded is not None:
            self.log.info(
                "job.republished",
                job=job_id,
                status=recorded["status"],
                redelivered=signal.redelivered,
                deliveries=signal.deliveries,
            )
            await self.publish(recorded, ctx)
            return self.reply(recorded)
        self.running.add(job_id)
        try:
            outcome = await self.run(job_id, job.get("type"), job.get("payload"), ctx)
        finally:
            self.running.discard(job_id)
        self.outcomes.record(outcome)  # committed: from here on the job is done, for good
        await self.publish(outcome, ctx)
        return self.reply(outcome)

    async def run(self, job_id: str, job_type: Any, payload: Any, ctx: Context) -> dict[str, Any]:
        """Split, run the tasks side by side, join: the outcome (nothing published yet)."""
        try:
            tasks = split(job_id, str(job_type), payload)
            results = await asyncio.gather(*(self.task(t, ctx) for t in tasks))
            result = join(str(job_type), {t.key: r for t, r in zip(tasks, results, strict=True)})
        except (JobError, BusError, KeyError, TypeError) as exc:
            error = str(exc) if isinstance(exc, JobError | BusError) else repr(exc)
            self.log.warning("job.failed", job=job_id, type=job_type, error=error)
            return {"id": job_id, "type": job_type, "status": "failed", "error": error}
        return {"id": job_id, "type": job_type, "status": "completed", "result": result}

    async def publish(self, outcome: dict[str, Any], ctx: Context) -> None:
        """`job.completed` {"id", "type", "result"} or `job.failed` {"id", "type", "error"}."""
        data = {k: v for k, v in outcome.items() if k != "status"}
        await ctx.emit(f"job.{outcome['status']}", data)

    @staticmethod
    def reply(outcome: dict[str, Any]) -> dict[str, Any]:
        """What a requester of `job.submit` gets: {"id", "status", "result" | "error"}."""
        return {k: v for k, v in outcome.items() if k != "type"}

    async def task(self, task: Task, ctx: Context) -> Any:
        """One task's result: a request to its pool, retried when nobody answered."""
        data = msgspec.to_builtins(task)
        for attempt in range(1, self.attempts + 1):
            try:
                return await ctx.request(task.pool, task.type, data, timeout=self.timeout)
            except RemoteError:
                raise  # an error *reply*: the worker refused the task itself
            except BusTimeout as exc:
                why: BusError = exc
            except BusError as exc:
                why = exc  # the broker refused it (a full queue ...): try again
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
            self.log.warning(
                "task.retry", job=task.job, key=task.key, attempt=attempt, error=str(why)
            )
        raise BusError(f"task {task.key} of job {task.job}: no answer after {self.attempts} tries")
