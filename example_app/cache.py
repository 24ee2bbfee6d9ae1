"""A small string cache: in the process by default, Redis when configured."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol


class Cache(Protocol):
    kind: str

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None: ...


class MemoryCache:
    kind = "memory"

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            self._entries.pop(key, None)
            return None
        return entry[1]

    async def set(self, key: str, value: str, ttl: float) -> None:
        self._entries[key] = (time.monotonic() + ttl, value)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def ping(self) -> None:
        return None


class RedisCache:
    kind = "redis"

    def __init__(self, client: Any) -> None:
        self._client = client

    async def get(self, key: str) -> str | None:
        value = await self._client.get(key)
        return None if value is None else value.decode()

    async def set(self, key: str, value: str, ttl: float) -> None:
        await self._client.set(key, value, px=int(ttl * 1000))

    async def delete(self, key: str) -> None:
        await self._client.delete(key)

    async def ping(self) -> None:
        await self._client.ping()


@asynccontextmanager
async def connect(redis_url: str | None) -> AsyncIterator[Cache]:
    """Open the cache named by the settings; close it on exit."""
    if not redis_url:
        yield MemoryCache()
        return
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.ping()  # fail the start now, not on the first request
        yield RedisCache(client)
    finally:
        await client.aclose()
