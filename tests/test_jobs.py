"""The hub's job logic, without processes: split, work, join."""

from __future__ import annotations

import pytest

from agentd.agents.examples.jobs import JobError, join, split, work


@pytest.mark.parametrize(
    ("job_type", "payload", "result"),
    [
        ("text.upper", {"text": "hello bus"}, {"text": "HELLO BUS"}),
        ("text.wordcount", {"text": "one two  three"}, {"words": 3}),
        ("math.sum", {"numbers": [1, 2, 3.5]}, {"sum": 6.5}),
        ("report", {"text": "a b", "numbers": [4, 5]}, {"words": 2, "sum": 9}),
    ],
)
def test_each_job_type_end_to_end(job_type, payload, result) -> None:
    tasks = split("j1", job_type, payload)
    results = {t.key: work(t.type, t.payload) for t in tasks}
    assert join(job_type, results) == result


def test_report_fans_out_to_both_pools() -> None:
    tasks = split("j", "report", {"text": "x", "numbers": [1]})
    assert sorted(t.pool for t in tasks) == ["math", "text"]


@pytest.mark.parametrize(
    ("job_type", "payload", "needle"),
    [
        ("nope", {}, "unknown job type"),
        ("text.upper", {"text": 3}, "payload.text"),
        ("math.sum", {"numbers": [1, "2"]}, "payload.numbers"),
        ("math.sum", {"numbers": [True]}, "payload.numbers"),
        ("report", {"text": "x"}, "payload.numbers"),
        ("text.upper", [1], "JSON object"),
    ],
)
def test_bad_jobs_are_refused_with_a_reason(job_type, payload, needle) -> None:
    with pytest.raises(JobError, match=needle):
        split("j", job_type, payload)
