"""The orchestration hub (etc/agentd.toml) and topology 1 (etc/examples/single.toml).

Real daemons on the bundled config files, real HTTP, real `curl`, real
`agentd ctl`, real `kill -9`. The walkthrough test runs the commands of the
README's "Walkthrough: the orchestration hub" — it reads them out of the
README and fails if the README has a command it does not run — with three
substitutions only: the port (a free one), the config (the same file with
its runtime dir in the test's temp dir) and the `<id>` / `<pid>` a reader
copies from the output above.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.agents.examples.jobs import JobError, split
from tests.conftest import DaemonProc, alive, wait_for

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "etc" / "agentd.toml"
SINGLE = ROOT / "etc" / "examples" / "single.toml"
README = ROOT / "README.md"
AGENTD = Path(sys.executable).parent / "agentd"
HUB_AGENTS = ["audit", "text@0", "text@1", "math@0", "math@1", "orchestrator", "ingress"]


# --- helpers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_config(port: int) -> str:
    """etc/agentd.toml as it is, but for the ingress port."""
    text, n = re.subn(r'(AGENTD_HTTP_PORT\s*=\s*)"8080"', rf'\g<1>"{port}"', HUB.read_text())
    assert n == 1, "etc/agentd.toml: the ingress port setting moved"
    return text


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one real HTTP request; 4xx/5xx are answers too."""
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_hub(d: DaemonProc, port: int) -> str:
    d.start()  # daemon.ready: every agent of the tree is up (READY on the bus)
    base = f"http://127.0.0.1:{port}"
    assert http("GET", f"{base}/healthz")[0] == 200
    return base


def audit_file(d: DaemonProc) -> Path:
    """The hub's audit trail: hub/audit.jsonl in state_dir, durable like its stores."""
    return d.state_dir / "hub" / "audit.jsonl"


def audit_lines(d: DaemonProc) -> list[dict[str, Any]]:
    path = audit_file(d)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the README walkthrough -------------------------------------------------------------


def readme_commands() -> list[str]:
    """Every command line of the walkthrough's ```sh blocks, in order."""
    text = README.read_text()
    start = text.index("## Walkthrough: the orchestration hub")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end], re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


class Shell:
    """Runs README lines with bash, from the repo root, as a reader would."""

    def __init__(self, port: int, config: Path) -> None:
        self.port = port
        self.env = dict(os.environ)
        self.config = config
        self.ran: list[str] = []

    def line(self, line: str, **fill: object) -> str:
        """The README line with the port, the agentd path and <id>/<pid> filled in."""
        cmd = line.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        cmd = cmd.replace(".venv/bin/agentd", str(AGENTD))
        cmd = cmd.replace("=etc/agentd.toml", f"={self.config}")
        for key, value in fill.items():
            cmd = cmd.replace(f"<{key}>", str(value))
        return cmd

    def run(self, line: str, **fill: object) -> str:
        if line.startswith("export "):  # the reader's shell keeps it; ours is one per line
            key, _, value = self.line(line).removeprefix("export ").partition("=")
            self.env[key] = value
            self._ran(line)
            return ""
        done = subprocess.run(
            ["bash", "-c", self.line(line, **fill)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        self._ran(line)
        return done.stdout

    def _ran(self, line: str) -> None:
        if line not in self.ran:
            self.ran.append(line)

    def json(self, line: str, **fill: object) -> Any:
        return json.loads(self.run(line, **fill))

    def follow(self, line: str) -> tuple[subprocess.Popen[str], list[str]]:
        """A command that keeps printing (events -f): its lines, collected by a thread."""
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {self.line(line)}"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
        self._ran(line)
        return proc, lines


@pytest.fixture
def follower() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_readme_walkthrough(daemon_factory, follower) -> None:
    cmds = readme_commands()
    run_cmd, post_report, get_job, export, status, tree, events_f, *rest = cmds
    post_slow, logs0, logs1, kill, get_again = rest
    assert run_cmd == ".venv/bin/agentd run --config etc/agentd.toml"  # what start() runs
    assert get_again == get_job
    port = free_port()
    d = daemon_factory(hub_config(port))
    base = start_hub(d, port)
    sh = Shell(port, d.config)

    # curl a job, then poll it until it is done
    job = sh.json(post_report)["id"]
    done = wait_for(lambda: _finished(sh.json(get_job, id=job)), 15, "the report job")
    assert done == {"id": job, "status": "completed", "result": {"words": 6, "sum": 6.5}}

    # status and tree
    sh.run(export)
    table = sh.run(status)
    for name in [*HUB_AGENTS, "bus"]:
        assert re.search(rf"^{re.escape(name)}\s+running\s+\d+", table, re.M), table
    drawn = sh.run(tree)
    assert "workers [one_for_one" in drawn and "└── ingress" in drawn
    assert all(name in drawn for name in HUB_AGENTS)
    events, lines = sh.follow(events_f)
    follower.append(events)
    wait_for(lambda: any('"daemon.ready"' in line for line in lines), 10, "events -f history")

    # kill -9 the worker that has the slow job's task
    slow = sh.json(post_slow)["id"]

    def holder() -> tuple[str, int] | None:
        for member, cmd in (("text@0", logs0), ("text@1", logs1)):
            last = sh.run(cmd)
            if f"job={slow}" in last and "task.started" in last:
                return member, int(re.search(r"pid=(\d+)", last).group(1))
        return None

    member, pid = wait_for(holder, 10, "a text worker to log task.started for the slow job")
    assert pid == d.pid(member)
    sh.run(kill, pid=pid)
    wait_for(lambda: not alive(pid), 5, "the worker to die")
    assert sh.json(get_job, id=slow)["status"] == "pending"
    done = wait_for(lambda: _finished(sh.json(get_job, id=slow)), 20, "the slow job")
    assert done == {"id": slow, "status": "completed", "result": {"text": "STILL HERE"}}

    # It was the other member that finished it, as a redelivery; the tree restarted ours.
    other_logs = logs1 if member == "text@0" else logs0
    assert f"job={slow}" in sh.run(other_logs) and "redelivered=True" in sh.run(other_logs)
    wait_for(lambda: _event(lines, "agent.ready", member, incarnation=1), 10, "events -f")
    exited = _event(lines, "agent.exited", member)
    assert exited["data"]["reason"] == "signal" and exited["data"]["signal"] == "SIGKILL"
    assert _event(lines, "agent.restarting", member)

    # The audit trail has each job exactly once; every README command ran.
    completed = [r["data"]["id"] for r in audit_lines(d) if r["type"] == "job.completed"]
    assert sorted(completed) == sorted([job, slow])
    assert sh.ran == list(dict.fromkeys(cmds[1:])), "a README command the test does not run"
    assert http("GET", f"{base}/healthz")[0] == 200


def _finished(body: dict[str, Any]) -> dict[str, Any] | None:
    """The job's record once it is no longer pending (None-valued fields dropped)."""
    if body["status"] == "pending":
        return None
    return {k: v for k, v in body.items() if v is not None}


def _event(lines: list[str], event: str, name: str, **data: Any) -> dict[str, Any] | None:
    for line in list(lines):
        record = json.loads(line)
        same = record["event"] == event and record["name"] == name
        if same and all(record["data"].get(k) == v for k, v in data.items()):
            return record
    return None


# --- the HTTP surface ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[tuple[DaemonProc, str]]:
    """One hub for the HTTP tests of this module (they do not kill anything)."""
    port = free_port()
    d = DaemonProc(tmp_path_factory.mktemp("hub"), hub_config(port))
    try:
        yield d, start_hub(d, port)
    finally:
        left = d.cleanup()
        assert not left, f"processes left behind: {left}"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, "expected a JSON object"),
        (b'{"payload": {}}', 400, "expected a JSON object"),
        (b'{"type": "math.sum"}', 400, "missing payload"),
        (b'{"type": "nope", "payload": {}}', 422, "unknown job type 'nope'"),
        (b'{"type": "math.sum", "payload": {"numbers": "12"}}', 422, "list of numbers"),
        (b'{"type": "text.upper", "payload": ["x"]}', 422, "must be a JSON object"),
        (b'{"type": "report", "payload": {"text": "x"}}', 422, "payload.numbers"),
        (b'{"type": "text.upper", "payload": {"text": "x", "delay": 99}}', 422, "delay"),
    ],
)
def test_bad_jobs_are_4xx_with_a_reason(hub, body: bytes, status: int, message: str) -> None:
    _, base = hub
    got, answer = http("POST", f"{base}/jobs", body)
    assert (got, message in answer["error"]) == (status, True), answer


def test_oversized_body_unknown_id_and_wrong_route(hub) -> None:
    d, base = hub
    big = json.dumps({"type": "text.upper", "payload": {"text": "x" * 2_000_000}}).encode()
    status, answer = http("POST", f"{base}/jobs", big)
    assert status == 413 and "too large" in answer["error"]
    assert http("GET", f"{base}/jobs/does-not-exist") == (404, {"error": "no job 'does-not-exist'"})
    assert http("GET", f"{base}/nothing-here")[0] == 404
    assert http("DELETE", f"{base}/jobs")[0] == 405
    # None of that hurt the ingress: same process, still answering, jobs still run.
    status, answer = http(
        "POST", f"{base}/jobs", b'{"type": "math.sum", "payload": {"numbers": [2]}}'
    )
    assert status == 202
    done = wait_for(lambda: _finished(http("GET", f"{base}/jobs/{answer['id']}")[1]), 10, "job")
    assert done["result"] == {"sum": 2}
    assert len(d.events("agent.ready", "ingress")) == 1


def test_every_job_type_end_to_end(hub) -> None:
    d, base = hub
    jobs = {
        "text.upper": ({"text": "abc def"}, {"text": "ABC DEF"}),
        "text.wordcount": ({"text": " one  two\nthree "}, {"words": 3}),
        "math.sum": ({"numbers": [1, 2.5, -4]}, {"sum": -0.5}),
        "report": ({"text": "a b", "numbers": []}, {"words": 2, "sum": 0}),
    }
    ids = {}
    for kind, (payload, _) in jobs.items():
        status, answer = http(
            "POST", f"{base}/jobs", json.dumps({"type": kind, "payload": payload}).encode()
        )
        assert status == 202, answer
        ids[kind] = answer["id"]
    for kind, (_, expected) in jobs.items():
        body = wait_for(lambda k=kind: _finished(http("GET", f"{base}/jobs/{ids[k]}")[1]), 10, kind)
        assert body == {"id": ids[kind], "status": "completed", "result": expected}

    def outcomes() -> dict[str, dict]:
        return {r["data"]["id"]: r for r in audit_lines(d) if r["type"].startswith("job.")}

    # The audit agent hears of an outcome after the job's status says so.
    seen = wait_for(lambda: (o := outcomes()).keys() >= set(ids.values()) and o, 10, "audit")
    assert {seen[i]["type"] for i in ids.values()} == {"job.completed"}
    assert all(seen[i]["source"] == "orchestrator" for i in ids.values())


def test_delay_is_validated_and_reaches_every_task() -> None:
    tasks = split("j", "report", {"text": "a", "numbers": [1], "delay": 0.5})
    assert [t.payload["delay"] for t in tasks] == [0.5, 0.5]
    assert "delay" not in split("j", "math.sum", {"numbers": [1]})[0].payload
    for bad in (-1, 31, "1", True):
        with pytest.raises(JobError, match="delay"):
            split("j", "math.sum", {"numbers": [1], "delay": bad})


# --- topology 1 --------------------------------------------------------------------------------


def test_single_workflow_runs_and_survives_a_kill(daemon_factory) -> None:
    d = daemon_factory(SINGLE.read_text())
    d.start()

    def work_done(after: int = 0) -> list[str]:
        out = d.ctl("logs", "producer", "-n", "50").stdout
        return [line for line in out.splitlines() if "work.done" in line][after:]

    first = wait_for(lambda: work_done() if len(work_done()) >= 2 else None, 10, "2 results")
    assert all("ok=True" in line for line in first), first
    os.kill(d.pid("math"), signal.SIGKILL)
    d.wait_event("agent.ready", "math", count=2, timeout=10)
    seen = len(work_done())
    more = wait_for(lambda: work_done(seen) if len(work_done(seen)) >= 2 else None, 10, "more")
    assert all("ok=True" in line for line in more), more
    assert len(d.events("agent.ready", "producer")) == 1  # the producer itself never died
