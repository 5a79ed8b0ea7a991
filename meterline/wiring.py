"""Wiring: build each component's inputs from the catalog and the settings. No domain logic."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aggregation.factory import open_store
from aggregation.ports import Store
from collectors.directory import Directory, MeterRule
from rating.catalog import Catalog
from rating.catalog_file import catalog_from_document

Clock = Callable[[], datetime]


class NoCatalogError(RuntimeError):
    pass


def system_clock() -> datetime:
    return datetime.now(UTC)


def frozen_clock(instant: datetime) -> Clock:
    """A clock that always says ``instant`` (the demo runs a compressed month at its end)."""
    if instant.tzinfo is None:
        raise ValueError(f"naive instant {instant!r}: give an offset or Z")
    return lambda: instant


def open_migrated_store(url: str) -> Store:
    store = open_store(url)
    store.migrate()
    return store


def current_catalog(store: Store) -> Catalog:
    stored = store.load_catalog()
    if stored is None:
        raise NoCatalogError("no catalog applied yet: run `meterline catalog apply FILE` first")
    return catalog_from_document(stored.document, f"catalog version {stored.version}")


def directory_for(catalog: Catalog) -> Directory:
    """What the collector validates against: the catalog's meters and resources."""
    return Directory(
        meters={
            name: MeterRule(max_lateness_s=meter.max_lateness // timedelta(seconds=1))
            for name, meter in catalog.meters.items()
        },
        resource_ids=frozenset(catalog.resources),
    )
