"""Wiring: build each component's inputs from the catalog and the settings. No domain logic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aggregation.factory import open_store
from aggregation.ports import AgentToken, Store
from collectors.auth import AgentCredential, Authenticator, hash_token, new_token
from collectors.directory import Directory, MeterRule
from collectors.ingest import Ingestor
from rating.catalog import Catalog
from rating.catalog_file import catalog_from_document

Clock = Callable[[], datetime]
_log = logging.getLogger(__name__)
REFRESH_INTERVAL_S_MAXIMUM = 3600.0


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
        plan_ids=frozenset(catalog.plans),
        subscription_ids=frozenset(catalog.subscriptions),
    )


# -- agent credentials ------------------------------------------------------------------------


def credentials_for(tokens: Sequence[AgentToken]) -> list[AgentCredential]:
    """The store's active tokens as the collector's credentials."""
    return [AgentCredential(t.token_hash, t.agent_id, t.scope) for t in tokens]


def issue_agent_token(store: Store, agent_id: str, scope: Sequence[str], now: datetime) -> str:
    """Create a token for ``agent_id``; store only its hash; return the token (show it once)."""
    token = new_token()
    AgentCredential(hash_token(token), agent_id, tuple(scope))  # same checks as the collector
    store.save_agent_token(hash_token(token), agent_id, scope, now)
    return token


@dataclass(frozen=True, slots=True)
class CollectorInputs:
    """What a collector validates and authenticates against, read at one moment."""

    directory: Directory
    authenticator: Authenticator


def read_collector_inputs(store_url: str) -> CollectorInputs:
    """Open the store, read the catalog and the active tokens, close it (a DuckDB file is
    then free for the CLI between two refreshes)."""
    store = open_store(store_url)
    try:
        directory = directory_for(current_catalog(store))
        authenticator = Authenticator(credentials_for(store.active_agent_tokens()))
    finally:
        store.close()
    return CollectorInputs(directory, authenticator)


class CollectorRefresher:
    """Keeps a running collector's directory and credentials current.

    Every ``interval_s`` it reads both from the store (in a worker thread) and swaps the new
    immutable objects into the ``Ingestor`` (attribute assignments on the event loop: each
    batch sees either the old or the new object). A revoked token therefore stops working
    within ``interval_s`` (open streams re-authenticate on their next batch). When the store
    cannot be read, the last known inputs stay in force and the failure is logged.
    """

    def __init__(
        self, ingestor: Ingestor, store_url: str, interval_s: float, *, authenticate: bool
    ) -> None:
        if not 0 < interval_s <= REFRESH_INTERVAL_S_MAXIMUM:
            raise ValueError(f"interval_s must be in (0, {REFRESH_INTERVAL_S_MAXIMUM}]")
        self._ingestor = ingestor
        self._store_url = store_url
        self._interval_s = interval_s
        self._authenticate = authenticate
        self.failures = 0

    async def refresh_once(self) -> None:
        inputs = await asyncio.to_thread(read_collector_inputs, self._store_url)
        self._ingestor.directory = inputs.directory
        if self._authenticate:
            self._ingestor.authenticator = inputs.authenticator

    async def run(self) -> None:
        """Refresh until cancelled."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh_once()
            except Exception:  # noqa: BLE001 - any store failure: keep serving, say so loudly
                self.failures += 1
                _log.exception("collector refresh from the store failed; keeping the last inputs")
