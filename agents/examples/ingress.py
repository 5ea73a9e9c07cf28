"""The hub's front door: HTTP on 127.0.0.1, jobs onto the bus, outcomes back.

    POST /jobs       {"type": "text.upper", "payload": {"text": "hi"}}  -> 202 {"id": ...}
    GET  /jobs/<id>  -> {"id", "status": "pending"|"completed"|"failed", "result", "error"}
    GET  /healthz    -> {"ok": true, ...}

An agent can be a server too: `setup()` starts an aiohttp server on the
agent's own event loop, and request handlers talk to the bus through
`self.ctx` like any signal handler would. Bad input never reaches the bus:
the body is parsed and the job validated (`jobs.split`) right here, and
every refusal is a 4xx with a JSON `{"error": ...}` saying what was wrong.

The 202 is a promise, so it comes last. A valid job is first committed to
the job store (SQLite, `$AGENTD_STATE_DIR/hub/jobs.db`, see `store`), then
sent to the orchestrator as `job.submit` with a broker receipt — the
orchestrator is `ack = true`, so "accepted" means journaled — and only
then answered. A bus that refuses the job gets the client a 503 and the
job is dropped from the store; no receipt at all (a broker restarting) is
asked again, `INGRESS_SEND_ATTEMPTS` times (default 3, 5 s each), before
the same 503. A job stored but never sent (this process killed in
between; its client got no answer) is sent when the ingress starts again:
the orchestrator runs each job id once, so sending twice is harmless.

The outcome comes back as the published `job.completed` / `job.failed`,
which this agent subscribes to with `@on` *and* in the config (`subscribe`,
with `ack = true`): the broker then journals each outcome for the ingress
while it is down, and it learns every one of them. So `GET /jobs/<id>`
answers the same across an ingress restart, a broker restart and a
daemon restart. A finished job older than the newest `INGRESS_MAX_JOBS`
jobs (default 100,000) is forgotten; a pending one never is.

Tracing: POST /jobs takes a W3C `traceparent` header (an invalid one, or
none, starts a new trace); the job's signals are in that trace, and the
answer's own `traceparent` header names it, so `agentd ctl trace <its trace
id>` shows the job's whole causal tree. A job resent after a restart of
this agent starts a new trace.

Config (the agent's `env` table): `AGENTD_HTTP_PORT` (default 8080),
`INGRESS_ORCHESTRATOR` (the orchestrator's name, default "orchestrator"),
`INGRESS_MAX_BODY` (bytes, default 1 MiB).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from agentd.agents import Agent, BusError, BusTimeout, Context, Signal, on
from agentd.daemon.log import get_logger

from .jobs import JobError, split
from .store import HubDb

HOST = "127.0.0.1"  # never a public interface: put a real proxy in front for that
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = web.AppKey("max_body", int)
PRUNE_EVERY = 1000  # new jobs between two prunes of old finished ones

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY,          -- arrival order, for pruning the oldest
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        payload BLOB,                     -- JSON; dropped once the job is finished
        status TEXT NOT NULL,             -- pending | completed | failed
        result BLOB,                      -- JSON
        error TEXT,
        sent INTEGER NOT NULL DEFAULT 0,  -- 1 once the bus gave a receipt for it
        created REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (sent) WHERE status = 'pending'",
)


class JobStore:
    """The ingress's jobs, one row each; every write is committed before it returns."""

    def __init__(self, db: HubDb, max_jobs: int = 100_000) -> None:
        self.db = db
        self.max_jobs = max_jobs
        self.added = 0
        with db.tx() as c:
            for statement in SCHEMA:
                c.execute(statement)
        self.prune()

    def add(self, job_id: str, job_type: str, payload: Any) -> None:
        """A new pending job, not sent yet."""
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO jobs (id, type, payload, status, created) VALUES (?, ?, ?, ?, ?)",
                (job_id, job_type, msgspec.json.encode(payload), "pending", time.time()),
            )
        self.added += 1
        if self.added % PRUNE_EVERY == 0:
            self.prune()

    def sent(self, job_id: str) -> None:
        with self.db.tx() as c:
            c.execute("UPDATE jobs SET sent = 1 WHERE id = ?", (job_id,))

    def drop(self, job_id: str) -> None:
        with self.db.tx() as c:
            c.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def finish(self, job_id: str, status: str, result: Any, error: str | None) -> bool:
        """Record a pending job's outcome; False if unknown or already finished."""
        encoded = None if result is None else msgspec.json.encode(result)
        with self.db.tx() as c:
            cur = c.execute(
                "UPDATE jobs SET status = ?, result = ?, error = ?, payload = NULL, sent = 1"
                " WHERE id = ? AND status = 'pending'",
                (status, encoded, error, job_id),
            )
        return cur.rowcount == 1

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job as GET /jobs/<id> shows it."""
        row = self.db.conn.execute(
            "SELECT id, status, result, error FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        result = None if row[2] is None else msgspec.json.decode(row[2])
        return {"id": row[0], "status": row[1], "result": result, "error": row[3]}

    def unsent(self) -> list[tuple[str, str, Any]]:
        """(id, type, payload) of the jobs stored but never accepted by the bus, oldest first."""
        rows = self.db.conn.execute(
            "SELECT id, type, payload FROM jobs WHERE status = 'pending' AND sent = 0 ORDER BY seq"
        ).fetchall()
        return [(i, t, msgspec.json.decode(p)) for i, t, p in rows]

    def counts(self) -> tuple[int, int]:
        """(jobs kept, jobs pending)."""
        (total,) = self.db.conn.execute("SELECT count(*) FROM jobs").fetchone()
        (pending,) = self.db.conn.execute(
            "SELECT count(*) FROM jobs WHERE status = 'pending'"
        ).fetchone()
        return total, pending

    def prune(self) -> None:
        """Forget finished jobs older than the newest `max_jobs`; pending ones are promises."""
        with self.db.tx() as c:
            c.execute(
                "DELETE FROM jobs WHERE status != 'pending'"
                " AND seq <= (SELECT max(seq) FROM jobs) - ?",
                (self.max_jobs,),
            )


def error(status: int, message: str) -> web.Response:
    """Every refusal looks the same to clients: a status and a readable reason."""
    return web.json_response({"error": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404 route, 405, 413 body too large) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        return error(413, f"request body too large (the limit is {limit} bytes)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason)


class Ingress(Agent):
    """POST /jobs, GET /jobs/<id>, GET /healthz."""

    async def setup(self) -> None:
        self.port = int(os.environ.get("AGENTD_HTTP_PORT", "8080"))
        self.orchestrator = os.environ.get("INGRESS_ORCHESTRATOR", "orchestrator")
        self.attempts = max(1, int(os.environ.get("INGRESS_SEND_ATTEMPTS", "3")))
        max_body = int(os.environ.get("INGRESS_MAX_BODY", str(1024 * 1024)))
        self.log = get_logger("agentd.ingress").bind(agent=self.name)
        self.db = HubDb("jobs.db", self.log)
        self.store = JobStore(self.db, int(os.environ.get("INGRESS_MAX_JOBS", "100000")))
        # Runs once READY is sent (receipts are read from then on); see `resend`.
        self.resending = asyncio.get_running_loop().create_task(self.resend())
        app = web.Application(client_max_size=max_body, middlewares=[json_errors])
        app[MAX_BODY] = max_body
        app.add_routes(
            [
                web.post("/jobs", self.post_job),
                web.get("/jobs/{id}", self.get_job),
                web.get("/healthz", self.healthz),
            ]
        )
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        # A port in use fails setup: the agent exits before READY and its
        # supervisor sees a crash, with the reason in the log's stderr tail.
        await web.TCPSite(self.runner, HOST, self.port).start()
        self.log.info(
            "ingress.listening", url=f"http://{HOST}:{self.port}", store=str(self.db.path)
        )

    async def teardown(self) -> None:
        self.resending.cancel()
        await self.runner.cleanup()
        self.db.close()

    # --- HTTP ------------------------------------------------------------------------------

    async def post_job(self, request: web.Request) -> web.Response:
        body = await request.read()  # raises 413 past client_max_size
        try:
            job = json.loads(body)
        except ValueError as exc:  # also bad UTF-8
            return error(400, f"body is not valid JSON: {exc}")
        if not isinstance(job, dict) or not isinstance(job.get("type"), str):
            return error(400, 'expected a JSON object {"type": "<job type>", "payload": {...}}')
        if "payload" not in job:
            return error(400, "missing payload")
        job_id = uuid.uuid4().hex
        try:
            split(job_id, job["type"], job["payload"])  # validation only: the same rules
        except JobError as exc:
            return error(422, str(exc))
        self.store.add(job_id, job["type"], job["payload"])  # committed: we can't forget it
        with self.ctx.trace(request.headers.get("traceparent")) as traceparent:
            try:
                await self.submit(job_id, job["type"], job["payload"])
            except BusError as exc:
                self.store.drop(job_id)
                refused = error(503, f"the orchestrator cannot take jobs right now: {exc}")
                refused.headers["traceparent"] = traceparent
                return refused
        self.store.sent(job_id)  # (if we die before this, the job is only sent twice)
        return web.json_response({"id": job_id}, status=202, headers={"traceparent": traceparent})

    async def get_job(self, request: web.Request) -> web.Response:
        record = self.store.get(request.match_info["id"])
        if record is None:
            return error(404, f"no job {request.match_info['id']!r}")
        return web.json_response(record)

    async def healthz(self, request: web.Request) -> web.Response:
        jobs, pending = self.store.counts()
        return web.json_response({"ok": True, "agent": self.name, "jobs": jobs, "pending": pending})

    # --- the bus -----------------------------------------------------------------------------

    async def submit(self, job_id: str, job_type: str, payload: Any) -> None:
        """Hand a job to the orchestrator; returns once the broker has accepted it.

        No receipt in time (a broker being restarted loses what was on the
        wire) is asked again: if the first one did get through, the
        orchestrator sees the job twice and runs it once. A refusal (a full
        queue, an unknown orchestrator) is final: BusError.
        """
        data = {"id": job_id, "type": job_type, "payload": payload}
        for attempt in range(1, self.attempts + 1):
            try:
                await self.ctx.send(self.orchestrator, "job.submit", data)
                return
            except BusTimeout as exc:
                if attempt == self.attempts:
                    raise
                self.log.warning("job.resubmit", job=job_id, attempt=attempt, error=str(exc))

    async def resend(self) -> None:
        """Send the jobs a previous incarnation stored but was killed before sending.

        Their clients got no answer, but the jobs are in the store and GET
        shows them: they are run, not dropped. Retried until the bus takes
        each one (a refusal waits 1 s, doubling to 30 s).
        """
        jobs = self.store.unsent()
        if jobs:
            self.log.info("ingress.resending", jobs=len(jobs))
        for job_id, job_type, payload in jobs:
            backoff = 1.0
            while True:
                try:
                    await self.submit(job_id, job_type, payload)
                    break
                except BusError as exc:
                    self.log.warning("job.resend_refused", job=job_id, error=str(exc))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
            self.store.sent(job_id)

    @on("job.completed", "job.failed")
    def outcome(self, signal: Signal, ctx: Context) -> None:
        """The first outcome of a job we know wins; later duplicates change nothing.

        A plain `def` (one local commit); with `ack = true` the SDK acks after
        it returns, so an outcome counts as heard only once it is committed.
        """
        data = signal.data if isinstance(signal.data, dict) else {}
        job_id = str(data.get("id"))
        if signal.type == "job.completed":
            self.store.finish(job_id, "completed", data.get("result"), None)
        else:
            self.store.finish(job_id, "failed", None, data.get("error"))
