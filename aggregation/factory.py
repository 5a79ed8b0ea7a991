"""Open a Store from a URL.

Accepted forms:

- ``postgresql://...`` or ``postgres://...``: a libpq URL (PostgreSQL or TimescaleDB);
- ``duckdb:///abs/path/store.duckdb``: a DuckDB file (created if missing);
- ``duckdb::memory:``: a throwaway in-memory DuckDB.

``open_store`` does not migrate: call ``store.migrate()`` once where the process decides
the schema may change (the CLI and the demo do it at start-up; it is a no-op when the schema
is current). The adapter modules are imported on demand, so a DuckDB-only process never
loads psycopg and vice versa.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from aggregation.ports import Store

ACCEPTED_FORMS = (
    "postgresql://...",
    "postgres://...",
    "duckdb:///absolute/path.duckdb",
    "duckdb::memory:",
)


def open_store(url: str) -> Store:
    """A connected, not yet migrated store for ``url`` (see the module docstring)."""
    if url.startswith(("postgresql://", "postgres://")):
        from aggregation.pg_store import PgStore

        return PgStore(url)
    if url == "duckdb::memory:":
        from aggregation.duckdb_store import DuckDbStore

        return DuckDbStore(":memory:")
    if url.startswith("duckdb:///"):
        path = url.removeprefix("duckdb://")
        if PurePosixPath(path).is_absolute() and path != "/":
            from aggregation.duckdb_store import DuckDbStore

            return DuckDbStore(path)
    raise ValueError(f"unsupported store URL {url!r}; expected one of: {', '.join(ACCEPTED_FORMS)}")
