"""Configuration from the environment, with embedded defaults that need no server."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What the service needs to know about its surroundings.

    ``DATABASE_URL`` selects PostgreSQL (``postgresql://...``); without it the service uses
    SQLite at ``SQLITE_PATH``. ``REDIS_URL`` selects Redis; without it the cache lives in the
    process, holding at most ``CACHE_MAX_ENTRIES`` entries. ``UPSTREAM_URL`` is the service
    ``/upstream/items`` asks; without it, the service asks itself, at the address and port
    the request came in on, whatever port it was started with.
    """

    database_url: str | None
    sqlite_path: str
    redis_url: str | None
    cache_ttl: float
    cache_max_entries: int
    reindex_seconds: float
    upstream_url: str | None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            sqlite_path=os.environ.get("SQLITE_PATH", "example_app.db"),
            redis_url=os.environ.get("REDIS_URL") or None,
            cache_ttl=float(os.environ.get("CACHE_TTL", "30")),
            cache_max_entries=int(os.environ.get("CACHE_MAX_ENTRIES", "10000")),
            reindex_seconds=float(os.environ.get("REINDEX_SECONDS", "0.05")),
            upstream_url=os.environ.get("UPSTREAM_URL") or None,
        )
