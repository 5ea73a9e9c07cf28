"""The journal file: replay, a torn tail, corruption, compaction, the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentd.bus.journal import HEADER, Journal, JournalError, Stored


def frame(i: int) -> bytes:
    return f"frame-{i}".encode()


def test_records_replay_in_order(tmp_path: Path) -> None:
    path = tmp_path / "bus.journal"
    j = Journal(path)
    assert j.open().entries == []
    j.write([("p", "w", "a", frame(1), 0, "", None), ("p", "w", "b", frame(2), 0, "", None)])
    j.write([("n", "w", "a", 2, "boom"), ("d", "w", "b")])
    j.write([("p", "x", "c", frame(3), 0, "", None), ("x", "x", "c", 5, "dead", 123.0)])
    j.write([("p", "y", "e", frame(4), 0, "", None), ("D", "y"), ("z",)])
    j.close()
    loaded = Journal(path).open()
    assert [(s.box, s.id, s.deliveries, s.error, s.dead_at) for s in loaded.entries] == [
        ("w", "a", 2, "boom", None),
        ("x", "c", 5, "dead", 123.0),
    ]
    assert loaded.torn_bytes == 0 and loaded.corrupt_moved_to is None


def test_a_torn_last_record_is_cut_off_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "bus.journal"
    j = Journal(path)
    j.open()
    j.write([("p", "w", "a", frame(1), 0, "", None)])
    good = path.stat().st_size
    j.close()
    with open(path, "ab") as f:
        f.write(HEADER.pack(100, 0) + b"partial")
    again = Journal(path)
    loaded = again.open()
    assert [s.id for s in loaded.entries] == ["a"]
    assert loaded.torn_bytes == HEADER.size + len(b"partial")
    assert path.stat().st_size == good
    again.write([("p", "w", "b", frame(2), 0, "", None)])  # appends after the cut
    again.close()
    assert [s.id for s in Journal(path).open().entries] == ["a", "b"]


def test_a_corrupt_journal_is_moved_aside_never_truncated(tmp_path: Path) -> None:
    path = tmp_path / "bus.journal"
    j = Journal(path)
    j.open()
    j.write([("p", "w", "a", frame(1), 0, "", None), ("p", "w", "b", frame(2), 0, "", None)])
    j.close()
    data = bytearray(path.read_bytes())
    data[HEADER.size + 3] ^= 0xFF  # flip a byte inside the first record's body
    path.write_bytes(bytes(data))
    loaded = Journal(path).open()
    assert loaded.entries == [] and loaded.corrupt_moved_to
    assert Path(loaded.corrupt_moved_to).read_bytes() == bytes(data)  # kept whole
    assert path.stat().st_size == 0


def test_compaction_keeps_just_the_live_entries(tmp_path: Path) -> None:
    path = tmp_path / "bus.journal"
    j = Journal(path)
    j.open()
    for i in range(200):
        j.write([("p", "w", str(i), frame(i) * 50, 0, "", None), ("d", "w", str(i))])
    j.write([("p", "w", "keep", frame(7), 3, "err", None)])
    before = path.stat().st_size
    j.compact([Stored("w", "keep", frame(7), 3, "err", None)])
    assert path.stat().st_size < before / 50
    j.write([("p", "w", "after", frame(8), 0, "", None)])
    j.close()
    entries = Journal(path).open().entries
    assert [(s.id, s.deliveries) for s in entries] == [("keep", 3), ("after", 0)]


def test_one_broker_per_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agentd.bus.journal.LOCK_WAIT", 0.1)
    path = tmp_path / "bus.journal"
    first = Journal(path)
    first.open()
    with pytest.raises(JournalError, match="locked"):
        Journal(path).open()
    first.close()
    Journal(path).open()


def test_always_mode_writes_through(tmp_path: Path) -> None:
    path = tmp_path / "bus.journal"
    j = Journal(path, sync="always")
    j.open()
    j.write([("p", "w", "a", frame(1), 0, "", None)])
    assert os.path.getsize(path) == j.size > 0
    j.close()
