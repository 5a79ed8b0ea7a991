"""Checks of ``Store.replace_hourly``'s inputs (re-rating), shared by both adapters.

Pure Polars. A re-rating replaces the usage of whole hours by sums recomputed from the
archived batches. The ledger (``batch_ledger``) is not touched: every batch stays counted
exactly once, now with its re-rated contribution, and a later delivery of it is still a
duplicate. For that to hold, the adapters check inside the replacing transaction, with
rating writes held off, that the batches the new values come from are exactly the batches
counted into those hours:

- every batch ``usage_sources`` (or, for versions before 6, ``batch_usage``) says added to
  one of the hours is among ``batches`` (else its usage would vanish: it was counted before
  the archive was on, or its file is missing);
- every batch of ``batches`` is in the ledger (else a worker has archived it but not yet
  committed it, and would add it again on top of the re-rated values).

Either failure raises ``ReplaceConflictError`` and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from aggregation.frames import BATCH_KEY, PARTIAL_KEY, check_frame, require_aware
from aggregation.ports import BATCH_KEY_SCHEMA, PARTIALS_SCHEMA, ReplaceConflictError

_HOUR = timedelta(hours=1)
EXAMPLES = 3


@dataclass(frozen=True, slots=True)
class Replacement:
    """``partials`` and ``batches`` checked, each row once. The database sums the partials
    into hour rows (exact: it raises on numeric(38,0) overflow, Polars would not)."""

    partials: pl.DataFrame
    batches: pl.DataFrame


def prepare_replacement(
    start: datetime,
    end: datetime,
    partials: pl.DataFrame,
    batches: pl.DataFrame,
    updated_at: datetime,
) -> Replacement:
    require_aware(start, "start")
    require_aware(end, "end")
    require_aware(updated_at, "updated_at")
    for name, instant in (("start", start), ("end", end)):
        if (instant - datetime(1970, 1, 1, tzinfo=instant.tzinfo)) % _HOUR:
            raise ValueError(f"{name} {instant.isoformat()} is not on a whole UTC hour")
    if not start < end:
        raise ValueError(f"empty range: start {start.isoformat()} >= end {end.isoformat()}")
    check_frame(partials, PARTIALS_SCHEMA, "partials")
    check_frame(batches, BATCH_KEY_SCHEMA, "batches")
    batches = batches.unique(maintain_order=True)
    partials = partials.unique(maintain_order=True)
    if partials.height != partials.select(PARTIAL_KEY).n_unique():
        raise ValueError(
            "partials frame holds different rows for the same (agent_id, seq, "
            "subscription_id, meter, hour_start)"
        )
    outside = partials.filter(
        (pl.col("hour_start") < start)
        | (pl.col("hour_start") >= end)
        | (pl.col("hour_start") != pl.col("hour_start").dt.truncate("1h"))
    )
    if outside.height:
        raise ValueError(
            f"partials frame has {outside.height} row(s) whose hour_start is not a whole hour "
            f"of [{start.isoformat()}, {end.isoformat()}), e.g. "
            f"{outside['hour_start'].head(EXAMPLES).to_list()}"
        )
    orphans = partials.join(batches, on=BATCH_KEY, how="anti")
    if orphans.height:
        raise ValueError(
            f"partials frame has {orphans.height} row(s) of batches missing from the batches "
            f"frame, e.g. {orphans.select(BATCH_KEY).unique().head(EXAMPLES).rows()}"
        )
    return Replacement(partials=partials, batches=batches)


def conflict(missing: Sequence[tuple[Any, ...]], uncounted: Sequence[tuple[Any, ...]]) -> None:
    """Raise ``ReplaceConflictError`` naming both kinds of mismatch, if any. Each list holds
    up to EXAMPLES rows (agent_id, seq, how many there are in all)."""
    problems: list[str] = []
    if missing:
        problems.append(
            f"{missing[0][2]} batch(es) counted into these hours are not in the re-rating "
            f"(not archived?), e.g. {[(a, s) for a, s, _ in missing]}"
        )
    if uncounted:
        problems.append(
            f"{uncounted[0][2]} archived batch(es) are not counted yet (a worker is rating "
            f"them: retry once it caught up), e.g. {[(a, s) for a, s, _ in uncounted]}"
        )
    if problems:
        raise ReplaceConflictError("; ".join(problems) + "; nothing was replaced")
