"""Bill-to and resellers (BILLING-SEMANTICS §9): who is invoiced for whose usage, at whose
prices.

- ``bill_to``: an account's lines go on its payer's invoice (the root of its ``bill_to``
  chain), rated over the *payer's* period, keyed by the account (``{payee}/{payer period
  start}/...``) and marked with ``account_id`` so documents group them under it.
- ``reseller``: the reseller's platform invoice carries its customers' usage at *platform*
  prices (in the reseller's currency, with the reseller's contract prices), grouped per
  customer; each customer gets its own invoice at the reseller's price book, over its own
  period, keyed ``{customer}/{date}`` and marked ``issuer = <reseller>`` (numbered in the
  reseller's own series). One usage stream, two ratings.

Each account on a consolidated invoice is rated on its own first (its charge lines and the
campaigns that name it), then the payer's commitment and tax profile apply to the whole
invoice. Accounts on nobody else's invoice are rated exactly as before (same bytes).

This module only works out the graph and the catalog views the ratings use; the catalog
loader has already refused unknown accounts, cycles, currency mismatches and unpriced
plans (``rating.catalog_file``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from rating.catalog import Account, Catalog, Subscription


class _Subscriptions(Protocol):
    """What ``CatalogIndex`` offers that the graph needs (avoids importing close.py)."""

    def subscriptions(self, account_id: str) -> tuple[Subscription, ...]: ...


@dataclass(frozen=True, slots=True)
class BillingGraph:
    catalog: Catalog
    payer: Mapping[str, str]  # account -> whose platform invoice carries its lines
    members: Mapping[str, tuple[str, ...]]  # payer -> the other accounts on its invoice
    platform_view: Catalog  # members (and their payers) without tax/commitment; resold
    #                         customers in the reseller's currency and contract prices
    invoice_view: Catalog  # the catalog without campaigns (consolidated totals)
    book_views: Mapping[str, Catalog]  # reseller -> the catalog its customers are rated on

    @classmethod
    def of(cls, catalog: Catalog) -> BillingGraph:
        accounts = catalog.accounts
        payer: dict[str, str] = {}
        for account_id, account in accounts.items():
            payer[account_id] = _root(accounts, account)
        members: dict[str, list[str]] = defaultdict(list)
        for account_id, root in payer.items():
            if root != account_id:
                members[root].append(account_id)
        if not members:  # nobody pays for anybody: everything as before
            return cls(catalog, payer, {}, catalog, catalog, {})
        consolidated = set(members) | {a for group in members.values() for a in group}
        view_accounts = dict(accounts)
        for account_id in consolidated:
            account = accounts[account_id]
            stripped = replace(account, tax=None, commitment={})
            if account.reseller is not None:
                reseller = accounts[account.reseller]
                stripped = replace(
                    stripped,
                    currency=reseller.currency,
                    price_overrides=reseller.price_overrides,
                )
            view_accounts[account_id] = stripped
        books: dict[str, Catalog] = {}
        for book in catalog.price_books.values():
            customers = {
                a.id: replace(a, price_overrides={})
                for a in accounts.values()
                if a.reseller == book.reseller_id
            }
            books[book.reseller_id] = replace(
                catalog,
                plans={**catalog.plans, **book.plans},
                accounts={**accounts, **customers},
                campaigns=book.campaigns,  # the reseller's, not the platform's
            )
        return cls(
            catalog,
            payer,
            {k: tuple(sorted(v)) for k, v in members.items()},
            replace(catalog, accounts=view_accounts),
            replace(catalog, campaigns={}),
            books,
        )

    def reseller_of(self, account_id: str) -> str | None:
        account = self.catalog.accounts.get(account_id)
        return None if account is None else account.reseller

    def on_invoice(self, account_id: str) -> tuple[str, ...]:
        """The accounts whose usage the invoice of ``account_id`` prices: itself and its
        members (platform invoice), itself alone (a reseller's customer's own invoice), or
        nobody (an account whose lines are on its payer's invoice)."""
        if self.reseller_of(account_id) is not None:
            return (account_id,)
        if self.payer.get(account_id, account_id) != account_id:
            return ()
        return (account_id, *self.members.get(account_id, ()))

    def subscriptions_on(self, account_id: str, index: _Subscriptions) -> tuple[Subscription, ...]:
        return tuple(s for a in self.on_invoice(account_id) for s in index.subscriptions(a))


def _root(accounts: Mapping[str, Account], account: Account) -> str:
    """The account whose platform invoice carries ``account``'s lines."""
    if account.reseller is not None:
        return account.reseller
    seen = {account.id}
    current = account
    while current.bill_to is not None and current.bill_to in accounts:
        current = accounts[current.bill_to]
        if current.id in seen:  # refused by the catalog loader; never loop
            raise ValueError(f"account {account.id!r}: bill_to forms a cycle")
        seen.add(current.id)
    return current.id
