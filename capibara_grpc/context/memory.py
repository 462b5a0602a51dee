"""Conversation memory: turns per conversation, in SQLite (WAL; the embedded default) or in
PostgreSQL (shared by context replicas), behind one interface.

Both keep their schema with numbered migrations, applied at startup (PostgreSQL under an advisory
lock, so replicas starting together do not race), and both make writes idempotent: a turn written
with a request id is stored once, however often a retried request writes it.

A turn is a user message, an answer, or a tool result: an assistant turn keeps the tool calls it
made (JSON text in `tool_calls`, NULL when none) and a tool turn the id of the call it answers
(`tool_call_id`), so the history goes back to the model as it was (schema version 3).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Protocol

from capibara_grpc.chat.types import ToolCall


@dataclass
class Turn:
    role: str  # user, assistant or tool
    content: str
    model_id: str
    created_at: str
    # An assistant turn's tool calls; a tool turn's call id.
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str = ""


class ConversationStore(Protocol):
    async def append(
        self,
        conversation_id: str,
        role: str,
        content: str,
        model_id: str = "",
        request_id: str = "",
        tool_calls: list[ToolCall] | None = None,
        tool_call_id: str = "",
    ) -> bool:
        """Store a turn; False when a turn with this request id was stored already."""
        ...

    async def turns(self, conversation_id: str) -> list[Turn]: ...

    async def delete(self, conversation_id: str) -> int: ...

    async def close(self) -> None: ...


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _calls_text(calls: list[ToolCall] | None) -> str | None:
    """Tool calls as the JSON text kept in the tool_calls column (NULL for none)."""
    if not calls:
        return None
    return json.dumps([{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)


def _turn(role, content, model_id, created_at, calls_text, tool_call_id) -> Turn:
    calls = [ToolCall(c["id"], c["name"], c["arguments"]) for c in json.loads(calls_text)] if calls_text else []
    return Turn(role, content, model_id, created_at, calls, tool_call_id or "")


# Version 3: tool calls and results; nullable columns, so existing rows are untouched.
TOOL_COLUMNS = """
        ALTER TABLE turns ADD COLUMN tool_calls TEXT;
        ALTER TABLE turns ADD COLUMN tool_call_id TEXT;
"""


# Migrations: (version, statements). Never edit a released one; add the next.
SQLITE_MIGRATIONS = [
    (
        1,
        """
        CREATE TABLE IF NOT EXISTS turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            model_id TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns (conversation_id, id);
    """,
    ),
    (
        2,
        """
        ALTER TABLE turns ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
        CREATE UNIQUE INDEX turns_once_per_request ON turns (conversation_id, request_id) WHERE request_id <> '';
    """,
    ),
    (3, TOOL_COLUMNS),
]
POSTGRES_MIGRATIONS = [
    (
        1,
        """
        CREATE TABLE turns (
            id BIGSERIAL PRIMARY KEY,
            conversation_id TEXT NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            model_id TEXT NOT NULL DEFAULT '',
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX turns_by_conversation ON turns (conversation_id, id);
    """,
    ),
    (
        2,
        """
        ALTER TABLE turns ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
        CREATE UNIQUE INDEX turns_once_per_request ON turns (conversation_id, request_id) WHERE request_id <> '';
    """,
    ),
    (3, TOOL_COLUMNS),
]


class SqliteStore:
    """One SQLite file; writes are serialized in-process and committed one transaction each, so
    concurrent requests to one conversation lose no turn and keep their order of arrival."""

    def __init__(self, path: pathlib.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turns'").fetchone():
            version = 1  # a database from before migrations were numbered
        for number, statements in SQLITE_MIGRATIONS:
            if number > version:
                self._db.executescript(f"BEGIN; {statements}; PRAGMA user_version = {number}; COMMIT;")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _append(
        self, conversation_id: str, role: str, content: str, model_id: str, request_id: str, calls, tool_call_id: str
    ) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO turns (conversation_id, role, content, model_id, created_at, request_id, "
                "tool_calls, tool_call_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, model_id, _now(), request_id, calls, tool_call_id or None),
            )
            return cursor.rowcount == 1

    def _turns(self, conversation_id: str) -> list[Turn]:
        with self._lock:
            rows = self._db.execute(
                "SELECT role, content, model_id, created_at, tool_calls, tool_call_id FROM turns "
                "WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        return [_turn(*row) for row in rows]

    def _delete(self, conversation_id: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,)).rowcount

    async def append(
        self,
        conversation_id: str,
        role: str,
        content: str,
        model_id: str = "",
        request_id: str = "",
        tool_calls: list[ToolCall] | None = None,
        tool_call_id: str = "",
    ) -> bool:
        return await asyncio.to_thread(
            self._append, conversation_id, role, content, model_id, request_id, _calls_text(tool_calls), tool_call_id
        )

    async def turns(self, conversation_id: str) -> list[Turn]:
        return await asyncio.to_thread(self._turns, conversation_id)

    async def delete(self, conversation_id: str) -> int:
        return await asyncio.to_thread(self._delete, conversation_id)

    async def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore:
    """PostgreSQL through a small async connection pool; the database orders and deduplicates."""

    # Any constant: the advisory lock that serializes migrations between replicas.
    MIGRATION_LOCK = 0x43415049

    def __init__(self, pool):
        self.pool = pool

    @classmethod
    async def open(cls, url: str, max_connections: int = 10) -> PostgresStore:
        from psycopg_pool import AsyncConnectionPool

        pool = AsyncConnectionPool(url, min_size=1, max_size=max_connections, open=False)
        await pool.open(wait=True, timeout=30)
        store = cls(pool)
        await store._migrate()
        return store

    async def _migrate(self) -> None:
        async with self.pool.connection() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            applied = {row[0] for row in await (await db.execute("SELECT version FROM schema_migrations")).fetchall()}
            for number, statements in POSTGRES_MIGRATIONS:
                if number not in applied:
                    await db.execute(statements)
                    await db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))

    async def schema_version(self) -> int:
        async with self.pool.connection() as db:
            return (await (await db.execute("SELECT max(version) FROM schema_migrations")).fetchone())[0]

    async def append(
        self,
        conversation_id: str,
        role: str,
        content: str,
        model_id: str = "",
        request_id: str = "",
        tool_calls: list[ToolCall] | None = None,
        tool_call_id: str = "",
    ) -> bool:
        async with self.pool.connection() as db:
            cursor = await db.execute(
                "INSERT INTO turns (conversation_id, role, content, model_id, request_id, tool_calls, tool_call_id) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (conversation_id, request_id) WHERE request_id <> '' DO NOTHING",
                (conversation_id, role, content, model_id, request_id, _calls_text(tool_calls), tool_call_id or None),
            )
            return cursor.rowcount == 1

    async def turns(self, conversation_id: str) -> list[Turn]:
        async with self.pool.connection() as db:
            rows = await (
                await db.execute(
                    "SELECT role, content, model_id, created_at, tool_calls, tool_call_id FROM turns "
                    "WHERE conversation_id = %s ORDER BY id",
                    (conversation_id,),
                )
            ).fetchall()
        return [
            _turn(role, content, model_id, created.isoformat(timespec="milliseconds"), calls, call_id)
            for role, content, model_id, created, calls, call_id in rows
        ]

    async def delete(self, conversation_id: str) -> int:
        async with self.pool.connection() as db:
            return (await db.execute("DELETE FROM turns WHERE conversation_id = %s", (conversation_id,))).rowcount

    async def close(self) -> None:
        await self.pool.close()


async def open_store(database: str, state_path: pathlib.Path) -> ConversationStore:
    """context.database: a postgresql:// URL, or a SQLite file (relative to the state directory)."""
    if database.startswith(("postgresql://", "postgres://")):
        return await PostgresStore.open(database)
    return SqliteStore(state_path / database)
