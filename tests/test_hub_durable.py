"""The hub's durable state: the ingress's job store, the orchestrator's recorded outcomes.

Real daemons on etc/agentd.toml (its state_dir in the test's temp dir, as
the conftest's DaemonProc sets it). What must hold:
- `GET /jobs/<id>` answers the same after the ingress restarts, including
  for a job whose outcome was published while the ingress was down;
- a job the ingress stored but never sent (killed in between) is sent when
  it starts again;
- a `job.submit` redelivered to the orchestrator after the job's outcome was
  recorded does not run the job again and does not complete it twice: the
  recorded outcome is published again, and the audit trail has it once.

The last one needs the orchestrator to die at an exact point, after the
commit and before the ack: `CrashingOrchestrator` below is the real
orchestrator with a `kill -9` of itself there, on its first incarnation.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agentd.agents.examples.audit import Audit, trail_path
from agentd.agents.examples.ingress import JobStore
from agentd.agents.examples.orchestrator import Orchestrator, Outcomes
from agentd.agents.examples.store import HubDb
from agentd.bus.log import get_logger
from tests.conftest import DaemonProc, wait_for
from tests.test_hub import (
    ROOT,
    audit_file,
    audit_lines,
    free_port,
    http,
    hub_config,
    start_hub,
)


class CrashingOrchestrator(Orchestrator):
    """The orchestrator, killing itself once a job's outcome is recorded (incarnation 0).

    CRASH_AT = "before_publish": the outcome is committed, nobody has heard it.
    CRASH_AT = "after_publish": the audit agent has written it (we wait for its
    line in CRASH_AUDIT_FILE), the submit is not acknowledged yet.
    """

    async def publish(self, outcome: dict[str, Any], ctx: Any) -> None:
        first = self.incarnation == 0
        if first and os.environ["CRASH_AT"] == "before_publish":
            os.kill(os.getpid(), signal.SIGKILL)
        await super().publish(outcome, ctx)
        if first and os.environ["CRASH_AT"] == "after_publish":
            audit = Path(os.environ["CRASH_AUDIT_FILE"])
            deadline = time.monotonic() + 10
            while not (audit.exists() and outcome["id"] in audit.read_text()):
                assert time.monotonic() < deadline, "the audit agent never wrote the outcome"
                await asyncio.sleep(0.02)  # (async: the heartbeat goes on meanwhile)
            os.kill(os.getpid(), signal.SIGKILL)


# --- helpers ----------------------------------------------------------------------------------


def post(base: str, job: dict[str, Any]) -> str:
    status, answer = http("POST", f"{base}/jobs", json.dumps(job).encode())
    assert status == 202, answer
    return answer["id"]


def finished(base: str, job_id: str, timeout: float = 15) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status, body = http("GET", f"{base}/jobs/{job_id}")
        assert status == 200, body
        return None if body["status"] == "pending" else body

    return wait_for(done, timeout, f"job {job_id}")


def outcomes_of(d: DaemonProc, job_id: str) -> list[dict[str, Any]]:
    """The audit trail's outcome lines for one job."""
    kinds = ("job.completed", "job.failed")
    return [r for r in audit_lines(d) if r["type"] in kinds and r["data"]["id"] == job_id]


def logs(d: DaemonProc, name: str) -> str:
    done = d.ctl("logs", name, "-n", "500")
    assert done.returncode == 0, done.stderr
    return done.stdout


def tasks_started(d: DaemonProc, job_id: str) -> int:
    """How many times a worker took a task of this job (both text workers' logs)."""
    text = logs(d, "text@0") + logs(d, "text@1")
    return sum(1 for line in text.splitlines() if "task.started" in line and job_id in line)


def upper(text: str, delay: float = 0.0) -> dict[str, Any]:
    payload: dict[str, Any] = {"text": text}
    if delay:
        payload["delay"] = delay
    return {"type": "text.upper", "payload": payload}


@pytest.fixture
def state_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Open the hub's stores the way its agents do, for a daemon's state_dir."""

    def use(d: DaemonProc) -> None:
        monkeypatch.setenv("AGENTD_STATE_DIR", str(d.state_dir))

    return use


# --- the ingress ------------------------------------------------------------------------------


def test_jobs_answer_after_the_ingress_restarts(daemon_factory) -> None:
    port = free_port()
    d = daemon_factory(hub_config(port))
    base = start_hub(d, port)
    early = post(base, upper("before"))
    assert finished(base, early)["result"] == {"text": "BEFORE"}

    # Down on purpose while its slow job finishes: the outcome waits in the broker.
    slow = post(base, upper("while away", delay=1.0))
    assert d.ctl("stop", "ingress").returncode == 0
    wait_for(lambda: outcomes_of(d, slow), 15, "the slow job's outcome in the audit trail")
    assert d.ctl("start", "ingress").returncode == 0
    d.wait_event("agent.ready", "ingress", count=2, timeout=15)
    assert finished(base, slow, timeout=5)["result"] == {"text": "WHILE AWAY"}
    assert http("GET", f"{base}/jobs/{early}")[1]["result"] == {"text": "BEFORE"}

    # kill -9, and a job in flight over it.
    flight = post(base, upper("in flight", delay=0.5))
    os.kill(d.pid("ingress"), signal.SIGKILL)
    d.wait_event("agent.ready", "ingress", count=3, timeout=15)
    assert finished(base, flight)["result"] == {"text": "IN FLIGHT"}
    for job_id, text in ((early, "BEFORE"), (slow, "WHILE AWAY")):
        assert http("GET", f"{base}/jobs/{job_id}") == (
            200,
            {"id": job_id, "status": "completed", "result": {"text": text}, "error": None},
        )
    assert http("GET", f"{base}/healthz")[1]["pending"] == 0
    assert [len(outcomes_of(d, j)) for j in (early, slow, flight)] == [1, 1, 1]


def test_a_job_stored_but_never_sent_is_sent_at_start(daemon_factory, state_env) -> None:
    """As if an ingress died between its commit and its send: the next one sends it.

    One of the two jobs was even finished already (the orchestrator recorded
    it, and the ingress missed the outcome): it is published again, not run.
    """
    port = free_port()
    d = daemon_factory(hub_config(port))
    state_env(d)
    log = get_logger("test")
    jobs_db, orch_db = HubDb("jobs.db", log), HubDb("orchestrator.db", log)
    store = JobStore(jobs_db)
    store.add("never-sent", "text.upper", {"text": "late"})
    store.add("done-already", "text.upper", {"text": "again"})
    Outcomes(orch_db).record(
        {"id": "done-already", "type": "text.upper", "status": "completed", "result": {"x": 1}}
    )
    jobs_db.close()
    orch_db.close()

    base = start_hub(d, port)
    assert finished(base, "never-sent")["result"] == {"text": "LATE"}
    assert finished(base, "done-already")["result"] == {"x": 1}  # the recorded one
    assert tasks_started(d, "done-already") == 0
    assert tasks_started(d, "never-sent") == 1
    wait_for(lambda: outcomes_of(d, "done-already"), 5, "the audit line")
    assert [len(outcomes_of(d, j)) for j in ("never-sent", "done-already")] == [1, 1]
    assert "job.republished" in logs(d, "orchestrator")


# --- the orchestrator ----------------------------------------------------------------------


def crashing_config(port: int, crash_at: str, audit: Path) -> str:
    """etc/agentd.toml with CrashingOrchestrator as the orchestrator."""
    text, n = re.subn(
        r'module = "agentd\.agents\.examples\.orchestrator:Orchestrator"\n',
        f'module = "tests.test_hub_durable:CrashingOrchestrator"\ncwd = "{ROOT}"\n',
        hub_config(port),
    )
    assert n == 1, "etc/agentd.toml: the orchestrator's module moved"
    text, n = re.subn(
        r"(env = \{ ORCHESTRATOR_ATTEMPTS[^}]*)\}",
        rf'\1, CRASH_AT = "{crash_at}", CRASH_AUDIT_FILE = "{audit}" }}',
        text,
    )
    assert n == 1, "etc/agentd.toml: the orchestrator's env moved"
    return text


@pytest.mark.parametrize("crash_at", ["before_publish", "after_publish"])
def test_a_job_redelivered_after_its_outcome_was_recorded_completes_once(
    daemon_factory, tmp_path: Path, crash_at: str
) -> None:
    port = free_port()
    trail = tmp_path / "state" / "hub" / "audit.jsonl"  # audit_file(d), before there is a d
    d = daemon_factory(crashing_config(port, crash_at, trail))
    assert audit_file(d) == trail
    base = start_hub(d, port)
    job = post(base, upper("once"))

    # Incarnation 0 recorded the outcome and died; the broker redelivered the
    # submit to incarnation 1, which published the recorded outcome.
    d.wait_event("agent.ready", "orchestrator", count=2, timeout=15)
    assert finished(base, job) == {
        "id": job,
        "status": "completed",
        "result": {"text": "ONCE"},
        "error": None,
    }
    orchestrator = logs(d, "orchestrator")
    again = [line for line in orchestrator.splitlines() if "job.republished" in line]
    assert len(again) == 1 and job in again[0] and "redelivered=True" in again[0], orchestrator
    assert tasks_started(d, job) == 1  # run once, by incarnation 0
    wait_for(lambda: outcomes_of(d, job), 5, "the audit line")
    assert len(outcomes_of(d, job)) == 1
    if crash_at == "after_publish":  # audit heard it twice and wrote it once
        wait_for(lambda: "audit.duplicate" in logs(d, "audit"), 5, "audit to see it again")
    # The second incarnation keeps working normally.
    assert finished(base, post(base, upper("next")))["result"] == {"text": "NEXT"}
    assert len(d.events("agent.ready", "orchestrator")) == 2


# --- the stores and the trail, in-process ----------------------------------------------------


def test_job_store_keeps_the_first_outcome_and_every_pending_job(state_env, tmp_path) -> None:
    d = DaemonProc(tmp_path, "")  # (only for its state_dir; never started)
    state_env(d)
    db = HubDb("jobs.db", get_logger("test"))
    store = JobStore(db, max_jobs=2)
    for i in range(4):
        store.add(f"j{i}", "math.sum", {"numbers": [i]})
    store.sent("j0")
    assert [j for j, _, _ in store.unsent()] == ["j1", "j2", "j3"]
    assert store.finish("j1", "completed", {"sum": 1}, None)
    assert not store.finish("j1", "failed", None, "late duplicate")  # the first one wins
    assert not store.finish("nope", "completed", {}, None)
    assert store.get("j1") == {
        "id": "j1",
        "status": "completed",
        "result": {"sum": 1},
        "error": None,
    }
    assert [j for j, _, _ in store.unsent()] == ["j2", "j3"]
    for i in range(4, 8):
        store.add(f"j{i}", "math.sum", {"numbers": [i]})
        store.finish(f"j{i}", "completed", {"sum": i}, None)
    store.prune()  # finished jobs older than the newest 2 go; pending ones never do
    assert store.get("j1") is None and store.get("j5") is None and store.get("j6") is not None
    assert store.counts() == (5, 3)  # j0, j2, j3 pending; j6, j7 finished
    db.close()
    again = JobStore(HubDb("jobs.db", get_logger("test")))  # a restart reads the same file
    assert again.get("j0")["status"] == "pending"
    again.db.close()


def test_outside_agentd_the_store_is_a_temporary_directory(monkeypatch) -> None:
    monkeypatch.delenv("AGENTD_STATE_DIR", raising=False)
    db = HubDb("jobs.db", get_logger("test"))
    assert db.temporary and db.path.exists()
    db.close()
    assert not db.dir.exists()


def outcome_signal(job_id: str, redelivered: bool = False) -> Any:
    from agentd.bus.envelope import signal as make_signal

    sig = make_signal("job.completed", {"id": job_id, "type": "t", "result": 1}, "orchestrator")
    return msgspec.structs.replace(sig, redelivered=redelivered)


def start_audit(path: Path, monkeypatch: pytest.MonkeyPatch) -> Audit:
    monkeypatch.setenv("AUDIT_FILE", str(path))
    audit = Audit()
    audit.name = "audit"
    audit.setup()
    return audit


def test_the_audit_trail_has_each_outcome_once_across_restarts(tmp_path, monkeypatch) -> None:
    trail = tmp_path / "audit.jsonl"
    audit = start_audit(trail, monkeypatch)
    audit.record(outcome_signal("a"), None)
    audit.record(outcome_signal("a", redelivered=True), None)  # the same job again
    audit.record(outcome_signal("b"), None)
    audit.teardown()
    # A restart reads the trail back; a line torn by a kill is ended and skipped.
    with open(trail, "ab") as f:
        f.write(b'{"signal": "x", "type": "job.completed", "data": {"id": "c"')
    audit = start_audit(trail, monkeypatch)
    audit.record(outcome_signal("a"), None)
    audit.record(outcome_signal("c", redelivered=True), None)  # its torn line did not count
    audit.teardown()
    lines = trail.read_bytes().splitlines()
    good = [json.loads(line) for line in lines if line.endswith(b"}")]
    assert [r["data"]["id"] for r in good] == ["a", "b", "c"]
    assert len(lines) == 4  # and the torn one, on its own line


def test_the_audit_trail_is_in_the_state_dir_by_default(tmp_path, monkeypatch) -> None:
    """Not the runtime dir, which systemd empties on every restart: state_dir's hub/."""
    monkeypatch.delenv("AUDIT_FILE", raising=False)
    monkeypatch.setenv("AGENTD_STATE_DIR", str(tmp_path / "state"))
    audit = Audit()
    audit.name = "audit"
    audit.setup()
    audit.record(outcome_signal("a"), None)
    audit.teardown()
    trail = tmp_path / "state" / "hub" / "audit.jsonl"
    assert audit.path == str(trail) and b'"id":"a"' in trail.read_bytes()
    assert trail_path({"AGENTD_STATE_DIR": "/s", "AUDIT_FILE": "/x/a.jsonl"}) == "/x/a.jsonl"
    monkeypatch.chdir(tmp_path)  # outside agentd: the working directory
    assert trail_path({}) == str(tmp_path / "audit.jsonl")
