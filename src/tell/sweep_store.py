"""Experiment helper — the sweep's store: one SQLite row per cell, claimed, finished or failed atomically.

In: a sweep's cells (key, label, resolved config). Out: ``sweep.sqlite`` with the cells' state, results and
timings, the current plan's order and the sweep's settings. Every state change is one transaction, so two
`tell sweep` processes never run the same cell, and a cell whose process died goes back to pending.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from tell.config import config_dict

DB_NAME = "sweep.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
  key TEXT PRIMARY KEY, label TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
  result TEXT, error TEXT, pid INTEGER, host TEXT, started REAL, finished REAL, wall_s REAL,
  attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS plan (key TEXT PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def open_store(path: str | Path) -> sqlite3.Connection:
    """Return a connection to the sweep database (created if missing); autocommit, explicit transactions."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.executescript(SCHEMA)
    return conn


def register(conn: sqlite3.Connection, cells: list, settings: dict | None = None) -> None:
    """Add new cells (sweep.Cell: key, label, cfg) as pending (known cells keep their state), make `cells` the sweep's plan and keep the
    sweep settings (metric, resamples) for the report. A plan already registered as it is writes nothing, so
    `tell sweep --status` leaves a committed sweep.sqlite byte for byte as it was."""
    settings_json = json.dumps(settings or {})
    if _registered_as(conn, [c.key for c in cells], settings_json):
        return
    with _transaction(conn):
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('sweep', ?)", (settings_json,))
        conn.executemany("INSERT OR IGNORE INTO cells (key, label, config) VALUES (?, ?, ?)",
                         [(c.key, c.label, json.dumps(config_dict(c.cfg))) for c in cells])
        conn.execute("DELETE FROM plan")
        conn.executemany("INSERT INTO plan (key, position) VALUES (?, ?)", [(c.key, i) for i, c in enumerate(cells)])


def _registered_as(conn: sqlite3.Connection, keys: list[str], settings: str) -> bool:
    """Return whether the database already holds exactly this plan, these settings and every one of its cells."""
    meta = conn.execute("SELECT value FROM meta WHERE name = 'sweep'").fetchone()
    plan = [r["key"] for r in conn.execute("SELECT key FROM plan ORDER BY position")]
    known = {r["key"] for r in conn.execute("SELECT key FROM cells")}
    return meta is not None and meta["value"] == settings and plan == keys and known.issuperset(keys)


@contextmanager
def _transaction(conn: sqlite3.Connection):
    """Hold the database's write lock for the block (BEGIN IMMEDIATE), so two sweeps never claim one cell."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _alive(pid: int | None) -> bool:
    try:
        return bool(pid) and os.kill(pid, 0) is None
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True


def recover_stale(conn: sqlite3.Connection) -> int:
    """Return how many 'running' cells of dead processes on this host were put back to pending."""
    host = socket.gethostname()
    stale = [r["key"] for r in conn.execute("SELECT key, pid FROM cells WHERE status = 'running' AND host = ?",
                                            (host,)) if not _alive(r["pid"])]
    for key in stale:
        conn.execute("UPDATE cells SET status = 'pending', error = 'interrupted: its process died' "
                     "WHERE key = ? AND status = 'running'", (key,))
    return len(stale)


def running_elsewhere(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Return the 'running' cells claimed on another host: this one cannot tell whether they still run."""
    return list(conn.execute("SELECT key, label, pid, host FROM cells WHERE status = 'running' AND host IS NOT ?",
                             (socket.gethostname(),)))


def release_running(conn: sqlite3.Connection) -> int:
    """Put the 'running' cells of other hosts back to pending (the caller vouches that none runs there any
    more: a copied sweep folder, a renamed machine); return how many. This host's cells are recover_stale's."""
    cursor = conn.execute("UPDATE cells SET status = 'pending', pid = NULL, error = 'released: its host was said to "
                          "run it no more' WHERE status = 'running' AND host IS NOT ?", (socket.gethostname(),))
    return cursor.rowcount


def claim(conn: sqlite3.Connection, key: str) -> bool:
    """Mark a pending or failed cell as running by this process; return False if another took it first."""
    with _transaction(conn):
        cursor = conn.execute("UPDATE cells SET status = 'running', pid = ?, host = ?, started = ?, error = NULL, "
                              "attempts = attempts + 1 WHERE key = ? AND status IN ('pending', 'failed')",
                              (os.getpid(), socket.gethostname(), time.time(), key))
    return cursor.rowcount == 1


def finish(conn: sqlite3.Connection, key: str, result: dict, wall_s: float) -> None:
    conn.execute("UPDATE cells SET status = 'done', result = ?, finished = ?, wall_s = ?, pid = NULL "
                 "WHERE key = ?", (json.dumps(result), time.time(), round(wall_s, 2), key))


def fail(conn: sqlite3.Connection, key: str, error: str, status: str = "failed") -> None:
    conn.execute("UPDATE cells SET status = ?, error = ?, pid = NULL WHERE key = ?", (status, error, key))


def planned_cells(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Return the rows of the current plan's cells, in plan order."""
    return list(conn.execute("SELECT cells.* FROM plan JOIN cells USING (key) ORDER BY plan.position"))


def db_path(out: str | Path) -> Path:
    """Return the database file of the sweep whose directory is `out`."""
    return Path(out) / DB_NAME
