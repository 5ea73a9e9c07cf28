"""The hub's job types: validation, splitting into tasks, joining results.

Pure functions, shared by the ingress (validation, so bad input is a 4xx
before anything touches the bus), the orchestrator (split and join) and the
workers (the work itself). Keeping them here means every job type is defined
in exactly one place:

    text.upper      {"text": s}                    -> {"text": S}
    text.wordcount  {"text": s}                    -> {"words": n}
    math.sum        {"numbers": [..]}              -> {"sum": x}
    report          {"text": s, "numbers": [..]}   -> {"words": n, "sum": x}

Any payload may also carry `"delay": seconds` (0..30): each of the job's
tasks then takes that long in its worker. It exists so that a person (or a
test) can kill a worker while it is busy and watch the task move on.
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_TEXT = 100_000
MAX_NUMBERS = 10_000
MAX_DELAY = 30.0


class JobError(ValueError):
    """A job the hub refuses: the message is safe to show to the client."""


class Task(msgspec.Struct, frozen=True):
    """One unit of work for a worker pool."""

    job: str  # job id
    key: str  # which part of the job ("text", "sum", ...)
    pool: str  # the worker pool's name, also the bus address
    type: str  # the signal type the workers route on
    payload: dict[str, Any]


def _text(payload: dict[str, Any]) -> str:
    text = payload.get("text")
    if not isinstance(text, str):
        raise JobError("payload.text must be a string")
    if len(text) > MAX_TEXT:
        raise JobError(f"payload.text is longer than {MAX_TEXT} characters")
    return text


def _numbers(payload: dict[str, Any]) -> list[float]:
    numbers = payload.get("numbers")
    if not isinstance(numbers, list) or not all(
        isinstance(n, int | float) and not isinstance(n, bool) for n in numbers
    ):
        raise JobError("payload.numbers must be a list of numbers")
    if len(numbers) > MAX_NUMBERS:
        raise JobError(f"payload.numbers has more than {MAX_NUMBERS} items")
    return numbers


def _delay(payload: dict[str, Any]) -> dict[str, float]:
    """The optional simulated work time, as a payload fragment ({} when absent)."""
    if "delay" not in payload:
        return {}
    delay = payload["delay"]
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
        raise JobError(f"payload.delay must be a number of seconds from 0 to {MAX_DELAY:g}")
    return {"delay": delay}


def task_delay(payload: dict[str, Any]) -> float:
    """Seconds a worker should spend on this task before answering (0 unless asked)."""
    return float(_delay(payload).get("delay", 0.0))


def split(job_id: str, job_type: str, payload: Any) -> list[Task]:
    """The tasks a job needs; JobError if the job is not one the hub knows."""
    if not isinstance(payload, dict):
        raise JobError("payload must be a JSON object")
    extra = _delay(payload)
    if job_type in ("text.upper", "text.wordcount"):
        text = {"text": _text(payload), **extra}
        return [Task(job_id, "result", "text", f"task.{job_type}", text)]
    if job_type == "math.sum":
        numbers = {"numbers": _numbers(payload), **extra}
        return [Task(job_id, "result", "math", "task.math.sum", numbers)]
    if job_type == "report":
        text, numbers = _text(payload), _numbers(payload)
        return [
            Task(job_id, "words", "text", "task.text.wordcount", {"text": text, **extra}),
            Task(job_id, "sum", "math", "task.math.sum", {"numbers": numbers, **extra}),
        ]
    raise JobError(f"unknown job type {job_type!r} (known: {', '.join(JOB_TYPES)})")


JOB_TYPES = ("text.upper", "text.wordcount", "math.sum", "report")


def join(job_type: str, results: dict[str, Any]) -> dict[str, Any]:
    """The job's result from its tasks' results (keyed by Task.key)."""
    if job_type == "report":
        return {"words": results["words"]["words"], "sum": results["sum"]["sum"]}
    return results["result"]


def work(task_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What a worker does for one task."""
    if task_type == "task.text.upper":
        return {"text": _text(payload).upper()}
    if task_type == "task.text.wordcount":
        return {"words": len(_text(payload).split())}
    if task_type == "task.math.sum":
        return {"sum": sum(_numbers(payload))}
    raise JobError(f"unknown task type {task_type!r}")
