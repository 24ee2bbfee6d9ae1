"""The items store: SQLite through aiosqlite by default, PostgreSQL through asyncpg."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id {id_type} PRIMARY KEY, name TEXT NOT NULL)"


class Database(Protocol):
    """What the app needs from a database."""

    kind: str

    async def add_item(self, name: str) -> int: ...

    async def get_item(self, item_id: int) -> str | None: ...

    async def list_items(self) -> list[dict[str, Any]]: ...

    async def ping(self) -> None: ...


class SQLiteDatabase:
    kind = "sqlite"

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def add_item(self, name: str) -> int:
        cursor = await self._connection.execute("INSERT INTO items (name) VALUES (?)", (name,))
        await self._connection.commit()
        return int(cursor.lastrowid)

    async def get_item(self, item_id: int) -> str | None:
        async with self._connection.execute(
            "SELECT name FROM items WHERE id = ?", (item_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def list_items(self) -> list[dict[str, Any]]:
        async with self._connection.execute("SELECT id, name FROM items ORDER BY id") as cursor:
            return [{"id": row[0], "name": row[1]} async for row in cursor]

    async def ping(self) -> None:
        async with self._connection.execute("SELECT 1") as cursor:
            await cursor.fetchone()


class PostgresDatabase:
    kind = "postgresql"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def add_item(self, name: str) -> int:
        return int(
            await self._pool.fetchval("INSERT INTO items (name) VALUES ($1) RETURNING id", name)
        )

    async def get_item(self, item_id: int) -> str | None:
        name = await self._pool.fetchval("SELECT name FROM items WHERE id = $1", item_id)
        return None if name is None else str(name)

    async def list_items(self) -> list[dict[str, Any]]:
        rows = await self._pool.fetch("SELECT id, name FROM items ORDER BY id")
        return [{"id": row["id"], "name": row["name"]} for row in rows]

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")


@asynccontextmanager
async def connect(database_url: str | None, sqlite_path: str) -> AsyncIterator[Database]:
    """Open the database named by the settings, create the schema, close it on exit."""
    if database_url:
        import asyncpg

        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
        try:
            await pool.execute(SCHEMA.format(id_type="BIGSERIAL"))
            yield PostgresDatabase(pool)
        finally:
            await pool.close()
    else:
        import aiosqlite

        connection = await aiosqlite.connect(sqlite_path)
        try:
            await connection.execute(SCHEMA.format(id_type="INTEGER"))
            await connection.commit()
            yield SQLiteDatabase(connection)
        finally:
            await connection.close()
