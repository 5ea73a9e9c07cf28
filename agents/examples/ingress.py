"""The hub's front door: HTTP on 127.0.0.1, jobs onto the bus, outcomes back.

    POST /jobs       {"type": "text.upper", "payload": {"text": "hi"}}  -> 202 {"id": ...}
    GET  /jobs/<id>  -> {"id", "status": "pending"|"completed"|"failed", "result", "error"}
    GET  /healthz    -> {"ok": true, ...}

An agent can be a server too: `setup()` starts an aiohttp server on the
agent's own event loop, and request handlers talk to the bus through
`self.ctx` like any signal handler would. Bad input never reaches the bus:
the body is parsed and the job validated (`jobs.split`) right here, and
every refusal is a 4xx with a JSON `{"error": ...}` saying what was wrong.

A valid job is sent to the orchestrator as `job.submit` (with a broker
receipt: if the bus refuses it the client gets a 503, not a silent loss).
The outcome comes back as the published `job.completed` / `job.failed`,
which this agent subscribes to with `@on`. Jobs are kept in memory (the
newest `INGRESS_MAX_JOBS`, default 100,000).

Config (the agent's `env` table): `AGENTD_HTTP_PORT` (default 8080),
`INGRESS_ORCHESTRATOR` (the orchestrator's name, default "orchestrator"),
`INGRESS_MAX_BODY` (bytes, default 1 MiB).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from agentd.agents import Agent, BusError, Context, Signal, on
from agentd.daemon.log import get_logger

from .jobs import JobError, split

HOST = "127.0.0.1"  # never a public interface: put a real proxy in front for that
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = web.AppKey("max_body", int)


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
        self.max_jobs = int(os.environ.get("INGRESS_MAX_JOBS", "100000"))
        max_body = int(os.environ.get("INGRESS_MAX_BODY", str(1024 * 1024)))
        self.jobs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.log = get_logger("agentd.ingress").bind(agent=self.name)
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
        self.log.info("ingress.listening", url=f"http://{HOST}:{self.port}")

    async def teardown(self) -> None:
        await self.runner.cleanup()

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
        self._remember(job_id, {"id": job_id, "status": "pending", "result": None, "error": None})
        data = {"id": job_id, "type": job["type"], "payload": job["payload"]}
        try:
            await self.ctx.send(self.orchestrator, "job.submit", data)
        except BusError as exc:
            self.jobs.pop(job_id, None)
            return error(503, f"the orchestrator cannot take jobs right now: {exc}")
        return web.json_response({"id": job_id}, status=202)

    async def get_job(self, request: web.Request) -> web.Response:
        record = self.jobs.get(request.match_info["id"])
        if record is None:
            return error(404, f"no job {request.match_info['id']!r}")
        return web.json_response(record)

    async def healthz(self, request: web.Request) -> web.Response:
        pending = sum(1 for r in self.jobs.values() if r["status"] == "pending")
        return web.json_response(
            {"ok": True, "agent": self.name, "jobs": len(self.jobs), "pending": pending}
        )

    # --- the bus -----------------------------------------------------------------------------

    @on("job.completed", "job.failed")
    def outcome(self, signal: Signal, ctx: Context) -> None:
        """The first outcome of a job we know wins; later duplicates change nothing."""
        data = signal.data if isinstance(signal.data, dict) else {}
        record = self.jobs.get(str(data.get("id")))
        if record is None or record["status"] != "pending":
            return
        if signal.type == "job.completed":
            record.update(status="completed", result=data.get("result"))
        else:
            record.update(status="failed", error=data.get("error"))

    def _remember(self, job_id: str, record: dict[str, Any]) -> None:
        self.jobs[job_id] = record
        while len(self.jobs) > self.max_jobs:
            self.jobs.popitem(last=False)
