"""From an account's charge lines to its invoice: discounts, commitment, taxes, totals.

The order is fixed (BILLING-SEMANTICS §6-§7): charge lines -> campaign discounts (never
below zero for their scope) -> the minimum-commitment true-up on the subtotal after
discounts -> tax on every line before tax -> invoice total = subtotal + tax lines.
"""

from __future__ import annotations

from collections.abc import Sequence

from invoicer.discounts import commitment_line, discount_lines
from invoicer.invoice import Invoice, InvoiceLine, invoice_key, make_invoice
from invoicer.periods import Period
from invoicer.taxes import tax_lines, tax_notes
from rating.catalog import Account, Catalog, Subscription


def finish_invoice(
    catalog: Catalog,
    account: Account,
    period: Period,
    charge_lines: Sequence[InvoiceLine],
    subscriptions: Sequence[Subscription],
) -> Invoice:
    """The account's invoice for ``period`` from its charge lines (pure).

    The commitment applies only when one of ``subscriptions`` (the account's) is active in
    the period; without a tax profile there are no tax lines and no notes.
    """
    prefix = invoice_key(account.id, period)
    lines = list(charge_lines)
    lines += discount_lines(
        list(catalog.campaigns.values()),
        account,
        period,
        charge_lines,
        {s.id: s for s in subscriptions},
    )
    if any(period.overlap_us(s.start, s.end) > 0 for s in subscriptions):
        true_up = commitment_line(account, period, prefix, sum(x.amount_minor for x in lines))
        if true_up is not None:
            lines.append(true_up)
    taxes = tax_lines(account, period, prefix, lines)
    notes = tax_notes(account.tax) if taxes else ()
    return make_invoice(
        account.id, account.name, account.currency, period, lines + taxes, notes=notes
    )
