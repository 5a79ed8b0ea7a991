"""Period close sharded by account over forked worker processes (ARCHITECTURE "Scale-out").

``rate_sharded(jobs, rate, workers)`` runs ``rate(job)`` for every job, split into
``workers`` contiguous shards in the given order, each in a child forked from the caller
(so the catalog, the index and the usage already read are shared copy-on-write, never
pickled), and returns the results in the order of ``jobs``: the same values, in the same
order, as ``[rate(job) for job in jobs]``. No library connection is used in a child: the
caller reads everything before and writes everything after.

Results come back pickled by a private pickler that flattens the invoice types
(``InvoiceLine``, ``Invoice``, ``Period``, ``StoredInvoice``) to tuples of their fields,
rebuilt without re-running their checks (they passed them in the child) instead of the
dataclass default (``fields()`` per object). Shipping ``Invoice`` objects still costs
about as much as a third of their rating (Decimals pickle as text): a caller that needs
only the documents should return only those (``close_period(keep_invoices=False)``).

A ``rate`` that raises ``NeedsParent`` (e.g. it would need the store) leaves that job to the
caller: its result slot holds ``NEEDS_PARENT`` and the caller rates it in-process. Any
other exception in a child is raised in the caller (the first shard's first).
"""

from __future__ import annotations

import copyreg
import io
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from operator import attrgetter
from typing import Any, Final, TypeVar

from aggregation.ports import StoredInvoice
from invoicer.invoice import Invoice, InvoiceLine
from invoicer.periods import Period

J = TypeVar("J")
R = TypeVar("R")

MAX_DEFAULT_WORKERS: Final = 8


def default_workers() -> int:
    """``os.cpu_count()`` capped at ``MAX_DEFAULT_WORKERS`` (1 when unknown)."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


class NeedsParent(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a job's rating in a child when only the parent can rate it."""


class _NeedsParentMarker:
    __slots__ = ()

    def __reduce__(self) -> str:
        return "NEEDS_PARENT"


NEEDS_PARENT: Final = _NeedsParentMarker()


# -- fast pickling of the invoice types ------------------------------------------------------

_TYPES: tuple[type[Any], ...] = (InvoiceLine, Invoice, Period, StoredInvoice)
_NAMES: dict[type[Any], tuple[str, ...]] = {t: tuple(f.name for f in fields(t)) for t in _TYPES}
_GETTERS = {t: attrgetter(*names) for t, names in _NAMES.items()}
_set = object.__setattr__


def _rebuild(kind: type[Any], values: tuple[Any, ...]) -> Any:
    obj = object.__new__(kind)
    for name, value in zip(_NAMES[kind], values, strict=True):
        _set(obj, name, value)
    return obj


def _reducer(kind: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    getter = _GETTERS[kind]

    def reduce(obj: Any) -> tuple[Any, ...]:
        return (_rebuild, (kind, getter(obj)))

    return reduce


_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH.update({t: _reducer(t) for t in _TYPES})


def _dumps(value: object) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(value)
    return out.getvalue()


# -- the shards -----------------------------------------------------------------------------

# What the forked children read (set by the parent just before forking; never pickled).
_shard_state: tuple[Sequence[Any], Callable[[Any], Any]] | None = None
_shard_lock = threading.Lock()  # one sharded rating at a time per process (the state above)


def _rate_all(jobs: Sequence[Any], rate: Callable[[Any], Any]) -> list[Any]:
    out: list[Any] = []
    for job in jobs:
        try:
            out.append(rate(job))
        except NeedsParent:
            out.append(NEEDS_PARENT)
    return out


def _rate_shard(lo: int, hi: int) -> bytes:
    assert _shard_state is not None  # set before the fork
    jobs, rate = _shard_state
    return _dumps(_rate_all(jobs[lo:hi], rate))


def shard_bounds(count: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous [lo, hi) ranges covering ``range(count)``, sizes within 1."""
    workers = max(1, min(workers, count))
    size, extra = divmod(count, workers)
    bounds = []
    lo = 0
    for i in range(workers):
        hi = lo + size + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def rate_sharded(jobs: Sequence[J], rate: Callable[[J], R], workers: int) -> list[R | Any]:
    """``[rate(job) for job in jobs]`` computed by ``workers`` processes: this one rates the
    first shard while ``workers - 1`` forked children rate the others (all in-process when
    ``workers`` <= 1 or there is at most one job); a slot is ``NEEDS_PARENT`` where ``rate``
    raised ``NeedsParent``."""
    if workers <= 1 or len(jobs) <= 1:
        return _rate_all(jobs, rate)
    with _shard_lock:
        return _rate_forked(jobs, rate, workers)


def _rate_forked(jobs: Sequence[Any], rate: Callable[[Any], Any], workers: int) -> list[Any]:
    global _shard_state  # noqa: PLW0603 - inherited by the forked children, by design
    _shard_state = (jobs, rate)
    try:
        bounds = shard_bounds(len(jobs), workers)
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=len(bounds) - 1, mp_context=context) as pool:
            futures = [pool.submit(_rate_shard, lo, hi) for lo, hi in bounds[1:]]
            lo, hi = bounds[0]
            results = _rate_all(jobs[lo:hi], rate)
            for future in futures:
                results.extend(pickle.loads(future.result()))  # noqa: S301 - our children
        return results
    finally:
        _shard_state = None
