"""Conversation memory: turns per conversation in SQLite (WAL), safe under concurrent writers."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import sqlite3
import threading
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    model_id TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id, id);
"""


@dataclass
class Turn:
    role: str
    content: str
    model_id: str
    created_at: str


class ConversationStore:
    """One SQLite file; writes are serialized in-process and committed one transaction each, so
    concurrent requests to one conversation lose no turn and keep their order of arrival."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _append(self, conversation_id: str, role: str, content: str, model_id: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute(
                "INSERT INTO turns (conversation_id, role, content, model_id, created_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, model_id, now),
            )

    def _turns(self, conversation_id: str) -> list[Turn]:
        with self._lock:
            rows = self._db.execute(
                "SELECT role, content, model_id, created_at FROM turns WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [Turn(*row) for row in rows]

    def _delete(self, conversation_id: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,)).rowcount

    async def append(self, conversation_id: str, role: str, content: str, model_id: str = "") -> None:
        await asyncio.to_thread(self._append, conversation_id, role, content, model_id)

    async def turns(self, conversation_id: str) -> list[Turn]:
        return await asyncio.to_thread(self._turns, conversation_id)

    async def delete(self, conversation_id: str) -> int:
        return await asyncio.to_thread(self._delete, conversation_id)
