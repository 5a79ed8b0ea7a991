"""Numbered SQL migrations per dialect, shipped as package data.

Files live in ``aggregation/migrations/<dialect>/NNNN_name.sql``: a four-digit version, an
underscore, a lowercase name. Versions of a dialect run 1, 2, 3, ... without gaps, and a
file, once released, never changes (add a new one instead). Both dialects keep the same
versions so that the two adapters stay at the same schema.

This module only reads files; the adapters apply them and record each applied version in
``schema_migrations`` (created by ``SCHEMA_MIGRATIONS_DDL``, which both dialects accept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

DIALECTS = ("postgresql", "duckdb")

SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER     PRIMARY KEY,
    name       TEXT        NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
)
"""

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file name without version and suffix, e.g. "init"
    sql: str


class MigrationLayoutError(ValueError):
    """The migration files of a dialect are misnamed, duplicated or have gaps."""


def discover(dialect: str) -> list[Migration]:
    """All migrations of ``dialect``, ordered by version."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown migration dialect {dialect!r} (expected one of {DIALECTS})")
    folder = resources.files("aggregation").joinpath("migrations", dialect)
    where = f"aggregation/migrations/{dialect}"
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationLayoutError(
                f"{where}/{entry.name}: migration file names must look like 0001_name.sql "
                "(four digits, underscore, lowercase letters, digits or underscores)"
            )
        version = int(match["version"])
        if version in found:
            raise MigrationLayoutError(
                f"{where}/{entry.name}: version {version} is already taken by "
                f"{version:04d}_{found[version].name}.sql"
            )
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    versions = sorted(found)
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationLayoutError(
            f"{where}: versions must run 1, 2, 3, ... without gaps; found {versions}"
        )
    return [found[v] for v in versions]


def pending(migrations: list[Migration], applied: set[int]) -> list[Migration]:
    """The migrations not yet applied, in order. A database that knows a version this code
    does not is newer than the code: refuse rather than guess."""
    known = {m.version for m in migrations}
    unknown = sorted(applied - known)
    if unknown:
        raise MigrationLayoutError(
            f"the database has schema versions {unknown} that this code does not know; "
            "it was migrated by a newer Meterline"
        )
    return [m for m in migrations if m.version not in applied]
