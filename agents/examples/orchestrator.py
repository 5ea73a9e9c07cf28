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
- this process dying: run it with `ack = true` too. `job.submit` is
  acknowledged only when the job's handler returns, so the next
  incarnation gets every job that was in flight and runs it again.
Each job id is handled once per incarnation: a duplicate submit of a job
that is running or finished is acknowledged and ignored, so a job is
completed exactly once.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from typing import Any

import msgspec

from agentd.agents import Agent, BusError, BusTimeout, Context, RemoteError, Signal, on
from agentd.daemon.log import get_logger

from .jobs import JobError, Task, join, split

REMEMBER = 100_000  # finished job ids kept for deduplication


class Orchestrator(Agent):
    """Split, route, retry, join, publish."""

    def setup(self) -> None:
        self.attempts = max(1, int(os.environ.get("ORCHESTRATOR_ATTEMPTS", "4")))
        self.timeout = float(os.environ.get("ORCHESTRATOR_TASK_TIMEOUT", "10"))
        self.running: set[str] = set()
        self.finished: OrderedDict[str, str] = OrderedDict()  # job id -> outcome
        self.log = get_logger("agentd.orchestrator").bind(agent=self.name)

    @on("job.submit")
    async def submit(self, signal: Signal, ctx: Context) -> dict[str, Any]:
        """Run one job to its outcome (the reply, if the submit was a request)."""
        job = signal.data if isinstance(signal.data, dict) else {}
        job_id = str(job.get("id", signal.id))
        if job_id in self.running or job_id in self.finished:
            self.log.info("job.duplicate", job=job_id, redelivered=signal.redelivered)
            return {"id": job_id, "status": self.finished.get(job_id, "pending")}
        self.running.add(job_id)
        try:
            outcome = await self.run(job_id, job.get("type"), job.get("payload"), ctx)
        finally:
            self.running.discard(job_id)
        self.finished[job_id] = outcome["status"]
        while len(self.finished) > REMEMBER:
            self.finished.popitem(last=False)
        return outcome

    async def run(self, job_id: str, job_type: Any, payload: Any, ctx: Context) -> dict[str, Any]:
        """Split, run the tasks side by side, join; publish and return the outcome."""
        try:
            tasks = split(job_id, str(job_type), payload)
            results = await asyncio.gather(*(self.task(t, ctx) for t in tasks))
            result = join(str(job_type), {t.key: r for t, r in zip(tasks, results, strict=True)})
        except (JobError, BusError, KeyError, TypeError) as exc:
            error = str(exc) if isinstance(exc, JobError | BusError) else repr(exc)
            await ctx.emit("job.failed", {"id": job_id, "type": job_type, "error": error})
            self.log.warning("job.failed", job=job_id, type=job_type, error=error)
            return {"id": job_id, "status": "failed", "error": error}
        await ctx.emit("job.completed", {"id": job_id, "type": job_type, "result": result})
        return {"id": job_id, "status": "completed", "result": result}

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
