"""Resource spans kept by the store (from lifecycle events) next to the catalog's (pure).

Hourly charges bill a resource for its spans (``rating.catalog.Span``): those the catalog
declares and those the store derived from lifecycle events (``Store.resource_spans``,
``aggregation.ports.SPANS_SCHEMA``, same meaning). :func:`catalog_with_store_spans` adds the
store's spans to the catalog's resources, each with its explicit subscription and plan, so
everything downstream (the index of resources per subscription, the hourly lines per plan,
re-rating for adjustments) sees both. Per resource the spans are a union: where a catalog
span and a store span overlap on the same plan, the instant counts once
(``merged_active_us``); on different plans, each plan bills its own spans (a conflict
between the catalog and the events, which the catalog owner should resolve by dropping the
catalog span). A resource the store knows and the catalog does not is added with the kind
``resource`` and the subscription of its first span.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import polars as pl

from rating.catalog import Catalog, Resource, Span

UNKNOWN_KIND = "resource"


def catalog_with_store_spans(catalog: Catalog, spans: pl.DataFrame) -> Catalog:
    """``catalog`` whose resources also hold the store's ``spans`` (SPANS_SCHEMA rows).

    Returns ``catalog`` itself when ``spans`` is empty."""
    if spans.is_empty():
        return catalog
    added: dict[str, list[tuple[str, Span]]] = defaultdict(list)
    for resource_id, subscription_id, plan_id, start, end in spans.select(
        "resource_id", "subscription_id", "plan_id", "span_start", "span_end"
    ).iter_rows():  # one row per span: a handful per resource
        added[resource_id].append((subscription_id, Span(start, end, subscription_id, plan_id)))
    resources = dict(catalog.resources)
    for resource_id, entries in sorted(added.items()):
        ordered = sorted(entries, key=lambda e: e[1].start)
        store_spans = tuple(span for _, span in ordered)
        known = resources.get(resource_id)
        if known is None:
            resources[resource_id] = Resource(resource_id, ordered[0][0], UNKNOWN_KIND, store_spans)
        else:
            resources[resource_id] = replace(known, spans=(*known.spans, *store_spans))
    return replace(catalog, resources=resources)
