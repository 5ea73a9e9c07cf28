"""The broker's trace ring: what happened to each of the last signals it routed.

Pure and in memory. The router (`router.py`) adds a `TraceRecord` for each
signal it routes and marks its outcome as it learns it (delivered, held,
kept, acked, replied, nacked, dead-lettered, error...); `answer` is the
whole trace a signal belongs to, for `agentd ctl trace` (frame `trace`).

A restarted broker has an empty ring, so the journal feeds it on start
(`from_journal`, called for each journal record during replay): every
signal kept for an `ack = true` agent since the journal's last compaction
comes back with its outcome (kept, nacked, dead-lettered, acked — a kept
request's "done" is "replied"). What went only through memory (signals
for agents without `ack`, replies) is gone with the broker that routed it.

The bound: the last `RING` signals at least, `2 * RING` at most (about
500 bytes each: 10 MB at most). It is a ring, not a log: a trace is for
asking "what happened to this job" soon after, and a busy bus routes 10,000
signals in well under a second, so an older trace may be partly or wholly
gone — the journal's part of it stays until the journal's compaction.

The ring is two generations of plain dicts (the newest `RING`, and the
`RING` before them): one dict insert per signal, which costs a fraction of
an ordered dict's insert-and-evict on the broker's hottest path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

from .envelope import TraceRecord, TraceReply

RING = 10_000
"""Signals the ring remembers, at least (the newest; at most twice as many). Bounded
because the broker routes without bound: each record is one small struct, and 10,000
keep a recent job's whole trace for a few MB of memory."""

ROUTED, DELIVERED, HELD, KEPT = "routed", "delivered", "held", "kept"
ACKED, REPLIED, NACKED, RETRYING = "acked", "replied", "nacked", "retrying"
DEAD, REDRIVEN, PURGED, ERROR = "dead-lettered", "redriven", "purged", "error"
DONE = "done"  # a spawn or terminate the daemon carried out


class _Envelope(msgspec.Struct, forbid_unknown_fields=False):
    """A journaled signal's fields as the ring needs them (`data` is skipped, not decoded)."""

    id: str
    type: str
    source: str
    time: float
    to: str | None = None
    correlation_id: str | None = None
    reply: bool = False
    traceparent: str | None = None
    causation_id: str | None = None


_envelope = msgspec.msgpack.Decoder(_Envelope)


class TraceRing:
    """Records by signal id: the newest `bound` at least, the oldest forgotten first."""

    def __init__(self, bound: int = RING) -> None:
        self.bound = bound
        self._new: dict[str, TraceRecord] = {}
        self._old: dict[str, TraceRecord] = {}

    def get(self, sig_id: str) -> TraceRecord | None:
        return self._new.get(sig_id) or self._old.get(sig_id)

    def __iter__(self) -> Iterator[TraceRecord]:
        """Every record, oldest generation first."""
        yield from self._old.values()
        yield from self._new.values()

    def __len__(self) -> int:
        return len(self._old) + len(self._new)

    def add(self, sig: Any) -> TraceRecord:
        """A signal being routed (any struct with the signal's fields); its record."""
        rec = self._new.get(sig.id) or self._old.get(sig.id)
        if rec is not None:  # the same signal again (a resend)
            return rec
        rec = TraceRecord(
            sig.id,
            sig.type,
            sig.source,
            sig.time,
            sig.to,
            sig.traceparent,
            sig.causation_id,
            sig.correlation_id,
            sig.reply,
        )
        self._insert(rec)
        return rec

    def _insert(self, rec: TraceRecord) -> None:
        new = self._new
        new[rec.id] = rec
        if len(new) >= self.bound:  # a new generation: the oldest one is forgotten
            self._old, self._new = new, {}

    def mark(
        self,
        sig_id: str | None,
        outcome: str,
        recipient: str | None = None,
        error: str = "",
        deliveries: int = 0,
    ) -> None:
        """News of a signal: `outcome` at `recipient` (a subscriber, a pool member)."""
        rec = self._new.get(sig_id)
        if rec is None:
            rec = self._old.get(sig_id)
            if rec is None:
                return
        rec.outcome = outcome
        if error:
            rec.error = error
        if deliveries:
            rec.deliveries = deliveries
        if recipient is None or recipient == rec.to:
            return
        if rec.to is None:  # a publication: one outcome per subscriber
            if rec.outcomes is None:
                rec.outcomes = {}
            rec.outcomes[recipient] = outcome
        else:
            rec.member = recipient

    def add_control(self, frame: Any, kind: str, source: str, now: float) -> None:
        """A spawn or terminate asked within a trace: a record like a signal's to the child.

        Its outcome comes with the daemon's SpawnReply (`control_answered`).
        """
        if frame.traceparent is None:
            return
        rec = TraceRecord(frame.id, kind, source, now, frame.name, frame.traceparent)
        rec.causation_id = frame.causation_id
        self._insert(rec)

    def control_answered(self, answer: Any) -> None:
        """The daemon's SpawnReply: done, or the error it gave."""
        self.mark(answer.id, DONE if answer.ok else ERROR, error=answer.error or "")

    def replied(self, reply: Any) -> None:
        """A reply passed: its request (the signal it was caused by) is answered."""
        request = reply.causation_id or reply.correlation_id
        if reply.error is not None:
            self.mark(request, REPLIED, reply.source, f"error reply: {reply.error}")
        else:
            self.mark(request, REPLIED, reply.source)

    # --- from the journal ----------------------------------------------------------------

    def from_journal(self, rec: list[Any]) -> None:
        """One journal record, during replay (journal.py's layout): what it says happened."""
        op = rec[0]
        if op == "p":
            _, box, sig_id, frame, deliveries, error, dead_at = rec
            try:
                env = _envelope.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
                return
            self.add(env)
            if dead_at is not None:
                self.mark(sig_id, DEAD, box, error, deliveries)
            else:
                self.mark(sig_id, KEPT, box, error, deliveries)
        elif op == "n":
            self.mark(rec[2], NACKED, rec[1], rec[4], rec[3])
        elif op == "x":
            self.mark(rec[2], DEAD, rec[1], rec[4], rec[3])
        elif op == "r":
            self.mark(rec[2], REDRIVEN, rec[1])
        elif op == "d":
            found = self.get(rec[2])
            if found is None:
                return
            if found.outcome == DEAD:
                outcome = PURGED
            elif found.correlation_id is not None and not found.reply:
                outcome = REPLIED  # a request is settled by its reply
            else:
                outcome = ACKED
            self.mark(rec[2], outcome, rec[1])

    # --- the answer ----------------------------------------------------------------------

    def answer(self, wanted: str) -> TraceReply:
        """Every record in the trace of signal `wanted` (or of the trace id `wanted`)."""
        rec = self.get(wanted)
        if rec is not None:
            tid = _trace_id(rec.traceparent)
            if tid is None:
                return TraceReply(records=[rec])
        elif len(wanted) == 32:
            tid = wanted
        else:
            tid = None
        found = [r for r in self if _in_trace(r, tid)] if tid else []
        if not found:
            why = (
                f"no signal or trace {wanted!r} in the broker's trace ring"
                f" (it keeps the last {self.bound:,} signals, and what the journal kept)"
            )
            return TraceReply(error=why)
        return TraceReply(records=found)


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a traceparent as the broker stores it (unchecked beyond its shape)."""
    if traceparent is None or len(traceparent) < 55 or traceparent[2] != "-":
        return None
    return traceparent[3:35]


def _in_trace(rec: TraceRecord, tid: str) -> bool:
    tp = rec.traceparent
    return tp is not None and tp.startswith(tid, 3)
