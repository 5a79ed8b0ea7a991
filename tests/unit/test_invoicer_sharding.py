"""Period close sharded over forked workers: the same bytes as the in-process close."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aggregation.factory import open_store
from aggregation.ports import Store, StoredInvoice
from invoicer.close import CloseResult, closable_at, close_period
from invoicer.issue import issue_invoices
from invoicer.sharding import NEEDS_PARENT, NeedsParent, rate_sharded, shard_bounds
from tests.golden.casefiles import GoldenCase, case_names, load_case, write_usage

NAMES = case_names()


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close()


def _store(stores: list[Store]) -> Store:
    store = open_store("duckdb::memory:")
    stores.append(store)
    store.migrate()
    return store


def _close(
    stores: list[Store], case: GoldenCase, workers: int, *, issue_first: bool, keep: bool = True
) -> tuple[CloseResult, list[StoredInvoice]]:
    store = _store(stores)
    now = closable_at(case.catalog, case.account_id, case.period)
    if issue_first:  # issued without usage: the usage arrives late and makes adjustments
        first = close_period(store, case.catalog, case.year, case.month, now)
        issue_invoices(store, [s.key for s in first.stored], now)
    write_usage(store, case.usage, rated_at=case.period.end)
    result = close_period(
        store, case.catalog, case.year, case.month, now, workers=workers, keep_invoices=keep
    )
    return result, store.load_invoices()


@pytest.mark.parametrize("issue_first", [False, True], ids=["drafts", "adjustments"])
@pytest.mark.parametrize("name", NAMES)
def test_two_workers_save_the_same_bytes_as_one(
    stores: list[Store], name: str, issue_first: bool
) -> None:
    case = load_case(name)
    one, saved_one = _close(stores, case, 1, issue_first=issue_first)
    two, saved_two = _close(stores, case, 2, issue_first=issue_first)
    lean, saved_lean = _close(stores, case, 2, issue_first=issue_first, keep=False)

    assert one.stored or one.untouched  # a close that does nothing would prove nothing
    assert two.stored == one.stored
    assert two.invoices == one.invoices
    assert two.untouched == one.untouched
    assert [(s.key, s.status, s.document) for s in saved_two] == [
        (s.key, s.status, s.document) for s in saved_one
    ]
    assert lean.stored == one.stored
    assert lean.invoices == ()
    assert lean.untouched == one.untouched
    assert [s.document for s in saved_lean] == [s.document for s in saved_one]


def test_many_accounts_over_three_workers_save_the_same_bytes(stores: list[Store]) -> None:
    # The golden case with the most accounts, over more workers than it has shards to spare.
    case = max((load_case(n) for n in NAMES), key=lambda c: (len(c.catalog.accounts), c.name))
    assert len(case.catalog.accounts) >= 3
    one, _ = _close(stores, case, 1, issue_first=False)
    three, _ = _close(stores, case, 3, issue_first=False)
    assert three.stored == one.stored
    assert three.invoices == one.invoices


def _square_unless_seven(value: int) -> int:
    if value == 7:
        raise NeedsParent
    return value * value


def test_rate_sharded_keeps_the_order_and_leaves_needs_parent_to_the_caller() -> None:
    jobs = list(range(11))
    expected = [NEEDS_PARENT if j == 7 else j * j for j in jobs]
    for workers in (1, 2, 3, 20):
        assert rate_sharded(jobs, _square_unless_seven, workers) == expected


def _fail_on_nine(value: int) -> int:
    if value == 9:
        raise ValueError(f"job {value} is wrong")
    return value


def test_a_failure_in_a_worker_is_raised_in_the_caller() -> None:
    with pytest.raises(ValueError, match="job 9 is wrong"):
        rate_sharded(list(range(10)), _fail_on_nine, 2)  # job 9 is in the child's shard


def test_shards_are_contiguous_cover_every_job_and_differ_by_at_most_one() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 8) == [(0, 1), (1, 2)]
    assert shard_bounds(0, 2) == [(0, 0)]
