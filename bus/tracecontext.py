"""W3C trace context (`traceparent`, version 00) as plain strings: parse, start, continue.

    00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
    ^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^ ^^
    version  trace id (32 hex)          parent id (16)   flags

Every bus signal carries one (docs/PROTOCOL.md §3.1): the trace id names the
whole causal tree a signal belongs to, the parent id is the signal's own
span. The rules are the W3C Trace Context (Level 1) ones: lowercase hex
only; version `ff` is invalid; an all-zero trace id or parent id is
invalid; version 00 is exactly 55 characters; a later version is read as
00 would be, provided what follows the flags starts a new field (`-`).

A value that breaks them is never an error here: whoever received it starts
a new trace instead (`child` of garbage is a new trace), as the W3C
processing model says. What we send is always version 00; of the flags
only `sampled` (0x01) is defined there, so the others are set to zero.
New traces are sampled: the broker records every signal.

Ids come from `random` (seeded from the OS, reseeded in a forked child):
they must be unique, not secret, and this is on every send — hence also
`next_span`, which skips the parsing for a parent already checked.
"""

from __future__ import annotations

import random
import re

VERSION = "00"
SAMPLED = 0x01
_HEAD = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def parse(value: object) -> tuple[str, str, int] | None:
    """(trace id, parent id, flags) of a valid traceparent; None for anything else."""
    if not isinstance(value, str):
        return None
    value = value.strip(" \t")  # optional whitespace around an HTTP header's value
    if _HEAD.match(value) is None:
        return None
    version, trace_id, parent_id = value[:2], value[3:35], value[36:52]
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == VERSION or value[55] != "-"):
        return None
    return trace_id, parent_id, int(value[53:55], 16)


def valid(value: object) -> bool:
    return parse(value) is not None


def trace_id(value: object) -> str | None:
    """The trace id of a valid traceparent, else None."""
    parsed = parse(value)
    return parsed[0] if parsed else None


def _span_id() -> str:
    while True:
        span = random.randbytes(8).hex()
        if span != _ZERO_SPAN:
            return span


def new_trace() -> str:
    """A traceparent that starts a new trace (a signal sent from outside any handler)."""
    while True:
        ids = random.randbytes(24).hex()
        if ids[:32] != _ZERO_TRACE and ids[32:] != _ZERO_SPAN:
            return f"{VERSION}-{ids[:32]}-{ids[32:]}-{SAMPLED:02x}"


def next_span(parent: str) -> str:
    """`child` of a parent known to be valid version 00 (from `accept` or `new_trace`).

    No parsing: the SDK checks a handled signal's traceparent once, then calls
    this for each signal the handler sends.
    """
    return f"{parent[:36]}{_span_id()}{parent[52:]}"


def child(parent: object) -> str:
    """A new span in the trace of `parent` (same trace id and sampled flag, a new parent id).

    An invalid or missing `parent` starts a new trace: never an error.
    """
    parsed = parse(parent)
    if parsed is None:
        return new_trace()
    trace, _, flags = parsed
    return f"{VERSION}-{trace}-{_span_id()}-{flags & SAMPLED:02x}"


def accept(value: object) -> str:
    """An incoming traceparent to continue (as version 00), or a new trace if it is invalid."""
    parsed = parse(value)
    if parsed is None:
        return new_trace()
    trace, parent, flags = parsed
    return f"{VERSION}-{trace}-{parent}-{flags & SAMPLED:02x}"
