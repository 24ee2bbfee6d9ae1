"""A small string cache: in the process by default, Redis when configured."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol


class Cache(Protocol):
    kind: str

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def ping(self) -> None: ...


class MemoryCache:
    """A bounded in-process cache: at most ``max_entries`` entries, each until its TTL passes.

    Entries are kept in write order. Each write first drops entries from the oldest end while
    they have expired or the cache is full, so that memory stays bounded even for keys that
    are never read again. With one TTL for every key (as in this app) the expired entries are
    all at that end; with mixed TTLs an expired entry behind a live one waits for its key to be
    read, or for the bound to evict it.
    """

    kind = "memory"

    def __init__(
        self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(
                f"max_entries must be a whole number of entries >= 1, not {max_entries!r}; "
                f"set CACHE_MAX_ENTRIES to a positive integer."
            )
        self.max_entries = max_entries
        self._clock = clock
        # An OrderedDict, not a dict: popping its oldest entry again and again stays O(1).
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        return value

    async def set(self, key: str, value: str, ttl: float) -> None:
        now = self._clock()
        entries = self._entries
        entries.pop(key, None)  # a rewritten key moves to the newest end
        while entries:
            expires, _ = next(iter(entries.values()))
            if expires > now and len(entries) < self.max_entries:
                break
            entries.popitem(last=False)
        entries[key] = (now + ttl, value)

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
async def connect(redis_url: str | None, max_entries: int = 10_000) -> AsyncIterator[Cache]:
    """Open the cache named by the settings; close it on exit.

    ``max_entries`` bounds the in-process cache; Redis bounds itself (its ``maxmemory``).
    """
    if not redis_url:
        yield MemoryCache(max_entries)
        return
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.ping()  # fail the start now, not on the first request
        yield RedisCache(client)
    finally:
        await client.aclose()
