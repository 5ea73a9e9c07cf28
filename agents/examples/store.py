"""Where the hub keeps what must outlive its processes: SQLite files in state_dir.

The ingress (`jobs.db`) and the orchestrator (`orchestrator.db`) each own one
database in `$AGENTD_STATE_DIR/hub/`, the daemon's `state_dir` (durable
across reboots, never the runtime dir's tmpfs). SQLite from the standard
library, in WAL mode with `synchronous = NORMAL`: a committed transaction is
in the write-ahead log before `commit()` returns, so it survives `kill -9`
of any process; a power loss can lose the last few commits (the same
promise as the bus journal's `journal_sync = "batch"`).

Run outside agentd (no AGENTD_STATE_DIR), an agent gets a fresh temporary
directory instead, removed at a graceful stop, and says so in a warning:
it works, but nothing in it survives the process. Under agentd the
variable is always set.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any


class HubDb:
    """One open database of the hub, and whether it will outlive this process."""

    def __init__(self, name: str, log: Any) -> None:
        state_dir = os.environ.get("AGENTD_STATE_DIR")
        if state_dir:
            self.dir = Path(state_dir) / "hub"
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.temporary = False
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="agentd-hub-"))
            self.temporary = True
            log.warning(
                "hub.not_durable",
                why="AGENTD_STATE_DIR is not set (not run by agentd?)",
                dir=str(self.dir),
            )
        self.path = self.dir / name
        # isolation_level=None: transactions are explicit (`with self.tx():`), so
        # it is visible in the code what is committed together, and when.
        self.conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def tx(self) -> Transaction:
        """`with db.tx(): ...`: one transaction, committed at the end (rolled back on error)."""
        return Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()
        if self.temporary:
            shutil.rmtree(self.dir, ignore_errors=True)


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT: the write lock at once, the commit before we go on."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if kind is not None else "COMMIT")
