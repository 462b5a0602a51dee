"""Conversation memory behind one interface: SQLite (the embedded default) and PostgreSQL (a real
server from Debian's packages, started here in a temporary directory). The same behaviour is
asked of both: order, erase, idempotent writes, no lost turn under concurrency, migrations that
can run again, data that survives a reopen."""

from __future__ import annotations

import asyncio

import pytest

from capibara_grpc.chat.types import ToolCall
from capibara_grpc.context.memory import POSTGRES_MIGRATIONS, PostgresStore, SqliteStore, open_store
from tests.support.stores import postgres_server


@pytest.fixture(scope="module")
def postgres_url():
    with postgres_server(15432) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """(context.database value, state directory) for each store."""
    if request.param == "sqlite":
        return "conversations.sqlite3", tmp_path
    url = request.getfixturevalue("postgres_url")
    return url, tmp_path


async def fresh(database, name: str):
    value, state = database
    store = await open_store(value, state)
    await store.delete(name)
    return store


async def test_turns_come_back_in_order_and_are_erased(database):
    store = await fresh(database, "order")
    for i in range(5):
        await store.append("order", "user" if i % 2 == 0 else "assistant", f"turn {i}", "phi")
    assert [t.content for t in await store.turns("order")] == [f"turn {i}" for i in range(5)]
    assert (await store.turns("order"))[1].role == "assistant" and (await store.turns("order"))[0].model_id == "phi"
    assert await store.turns("nobody-has-this") == []
    assert await store.delete("order") == 5
    assert await store.turns("order") == []
    await store.close()


async def test_a_retried_write_is_stored_once(database):
    store = await fresh(database, "retry")
    assert await store.append("retry", "user", "hola", request_id="req-1:user") is True
    assert await store.append("retry", "user", "hola", request_id="req-1:user") is False
    assert await store.append("retry", "assistant", "¡Hola!", request_id="req-1:assistant") is True
    assert await store.append("retry", "user", "hola", request_id="req-2:user") is True  # a new request
    assert await store.append("retry", "user", "sin clave") is True
    assert await store.append("retry", "user", "sin clave") is True  # no key: no deduplication
    assert [t.content for t in await store.turns("retry")] == ["hola", "¡Hola!", "hola", "sin clave", "sin clave"]
    await store.close()


async def test_concurrent_writers_lose_no_turn(database):
    stores = [await fresh(database, "busy") for _ in range(3)]  # three replicas of the context service
    await asyncio.gather(*(stores[i % 3].append("busy", "user", f"turn {i}", request_id=f"r{i}") for i in range(90)))
    contents = [t.content for t in await stores[0].turns("busy")]
    assert sorted(contents) == sorted(f"turn {i}" for i in range(90))
    for store in stores:
        await store.close()


async def test_migrations_run_again_harmlessly_and_data_survives_a_reopen(database):
    store = await fresh(database, "kept")
    await store.append("kept", "user", "recuérdame", request_id="k:user")
    await store.close()
    again = await open_store(*database)  # migrations run again: nothing to do
    assert [t.content for t in await again.turns("kept")] == ["recuérdame"]
    assert await again.append("kept", "user", "recuérdame", request_id="k:user") is False
    version = again.schema_version if isinstance(again, SqliteStore) else await again.schema_version()
    assert version == 3
    await again.close()


async def test_a_sqlite_file_from_before_numbered_migrations_is_upgraded(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE turns (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL, role TEXT NOT NULL,
                            content TEXT NOT NULL, model_id TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL);
        INSERT INTO turns (conversation_id, role, content, created_at) VALUES ('old', 'user', 'de antes', '2026-01-01');
    """)
    old.commit()
    old.close()
    store = SqliteStore(path)
    assert store.schema_version == 3
    assert [t.content for t in await store.turns("old")] == ["de antes"]
    assert await store.append("old", "user", "nuevo", request_id="x") and not await store.append(
        "old", "user", "nuevo", request_id="x"
    )
    await store.close()


async def test_tool_calls_and_results_are_kept_in_order(database):
    store = await fresh(database, "tools")
    call = ToolCall("call_1", "get_weather", '{"city": "Málaga"}')
    await store.append("tools", "user", "¿qué tiempo hace en Málaga?", request_id="t1:user")
    await store.append("tools", "assistant", "", "phi", "t1:assistant", tool_calls=[call])
    for _ in range(2):  # a retried request: each result stored once
        await store.append("tools", "tool", "22 C", request_id="t2:tool:call_1", tool_call_id="call_1")
        await store.append("tools", "tool", "", request_id="t2:tool:call_2", tool_call_id="call_2")
    turns = await store.turns("tools")
    assert [(t.role, t.content, t.tool_calls, t.tool_call_id) for t in turns] == [
        ("user", "¿qué tiempo hace en Málaga?", [], ""),
        ("assistant", "", [call], ""),
        ("tool", "22 C", [], "call_1"),
        ("tool", "", [], "call_2"),
    ]
    await store.close()


async def test_a_postgres_database_of_schema_2_is_migrated_in_place(postgres_url):
    """A database written by the previous release (migrations 1 and 2 only) gets the tool columns;
    its turns are kept and its idempotency keys still hold."""
    import psycopg

    schema = "before_tools"
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-csearch_path%3D{schema}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as db:
        await db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await db.execute(f"CREATE SCHEMA {schema}")
        await db.execute(f"SET search_path TO {schema}")
        await db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for number, statements in POSTGRES_MIGRATIONS[:2]:
            await db.execute(statements)
            await db.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
        await db.execute(
            "INSERT INTO turns (conversation_id, role, content, model_id, request_id) "
            "VALUES ('old', 'user', 'de antes', '', 'a:user')"
        )
    store = await PostgresStore.open(url)
    assert await store.schema_version() == 3
    assert [(t.role, t.content, t.tool_calls) for t in await store.turns("old")] == [("user", "de antes", [])]
    assert not await store.append("old", "user", "de antes", request_id="a:user")
    await store.append("old", "assistant", "", "phi", "b:assistant", tool_calls=[ToolCall("c", "f", "{}")])
    assert (await store.turns("old"))[-1].tool_calls == [ToolCall("c", "f", "{}")]
    await store.close()
