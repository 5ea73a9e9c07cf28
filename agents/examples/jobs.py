"""The hub's job types: validation, splitting into tasks, joining results.

Pure functions, shared by the ingress (validation, so bad input is a 4xx
before anything touches the bus), the orchestrator (split and join) and the
workers (the work itself). Keeping them here means every job type is defined
in exactly one place:

    text.upper      {"text": s}                    -> {"text": S}
    text.wordcount  {"text": s}                    -> {"words": n}
    math.sum        {"numbers": [..]}              -> {"sum": x}
    report          {"text": s, "numbers": [..]}   -> {"words": n, "sum": x}
"""

from __future__ import annotations

from typing import Any

import msgspec

MAX_TEXT = 100_000
MAX_NUMBERS = 10_000


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


def split(job_id: str, job_type: str, payload: Any) -> list[Task]:
    """The tasks a job needs; JobError if the job is not one the hub knows."""
    if not isinstance(payload, dict):
        raise JobError("payload must be a JSON object")
    if job_type in ("text.upper", "text.wordcount"):
        return [Task(job_id, "result", "text", f"task.{job_type}", {"text": _text(payload)})]
    if job_type == "math.sum":
        return [Task(job_id, "result", "math", "task.math.sum", {"numbers": _numbers(payload)})]
    if job_type == "report":
        text, numbers = _text(payload), _numbers(payload)
        return [
            Task(job_id, "words", "text", "task.text.wordcount", {"text": text}),
            Task(job_id, "sum", "math", "task.math.sum", {"numbers": numbers}),
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
