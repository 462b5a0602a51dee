"""Conversation memory behind one interface: SQLite (the embedded default) and PostgreSQL (a real
server from Debian's packages, started here in a temporary directory). The same behaviour is
asked of both: order, erase, idempotent writes, no lost turn under concurrency, migrations that
can run again, data that survives a reopen."""

from __future__ import annotations

import asyncio

import pytest

from capibara_grpc.context.memory import SqliteStore, open_store
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
    assert version == 2
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
    assert store.schema_version == 2
    assert [t.content for t in await store.turns("old")] == ["de antes"]
    assert await store.append("old", "user", "nuevo", request_id="x") and not await store.append(
        "old", "user", "nuevo", request_id="x"
    )
    await store.close()
