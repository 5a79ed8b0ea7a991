"""Checks of the frames handed to ``Store.write_resource_spans``, shared by both adapters.

Pure: Polars only, whole frames at a time, so a bad frame is refused with a clear message
before anything is written.
"""

from __future__ import annotations

import polars as pl

from aggregation.ports import SPANS_SCHEMA

SPAN_KEY = ("resource_id", "span_start")
_NULLABLE = ("span_end",)
_EXAMPLES = 3


def check_spans(spans: pl.DataFrame) -> pl.DataFrame:
    """Refuse a spans frame that does not match SPANS_SCHEMA, has nulls outside span_end,
    ends a span at or before its start, or names one (resource_id, span_start) twice with
    different values. Returns the frame with identical repeats removed."""
    problems: list[str] = []
    missing = [c for c in SPANS_SCHEMA if c not in spans.schema]
    if missing:
        problems.append(f"missing columns {missing}")
    extra = [c for c in spans.schema if c not in SPANS_SCHEMA]
    if extra:
        problems.append(f"unexpected columns {extra}")
    problems.extend(
        f"column {c!r} is {spans.schema[c]}, expected {dtype}"
        for c, dtype in SPANS_SCHEMA.items()
        if c in spans.schema and spans.schema[c] != dtype
    )
    if not problems and spans.height:
        nulls = spans.null_count().row(0, named=True)
        problems.extend(
            f"column {c!r} has {n} null(s)" for c, n in nulls.items() if n and c not in _NULLABLE
        )
    if problems:
        raise ValueError("resource spans frame does not match its schema: " + "; ".join(problems))

    backwards = spans.filter(pl.col("span_end") <= pl.col("span_start"))
    if backwards.height:
        raise ValueError(
            f"resource spans frame has {backwards.height} span(s) ending at or before their "
            f"start (resource_id, span_start): {_examples(backwards)}"
        )
    unique = spans.unique(maintain_order=True)
    if unique.height != unique.select(SPAN_KEY).n_unique():
        clashes = unique.filter(pl.struct(SPAN_KEY).is_duplicated())
        raise ValueError(
            "resource spans frame holds different rows for the same (resource_id, "
            f"span_start): {_examples(clashes)}"
        )
    return unique


def _examples(frame: pl.DataFrame) -> str:
    return ", ".join(str(r) for r in frame.select(SPAN_KEY).head(_EXAMPLES).rows())
