"""PostgreSQL binary array parameters built from whole Polars columns (NumPy, no psycopg).

``PgStore`` sends bulk rows as ``unnest()`` arrays. psycopg dumps a Python list element by
element; these encoders write the binary array wire format (``array_send``) of a whole
column at once from its buffers instead: a 20-byte header, then per element a 4-byte
big-endian length and the value. ``pg_store`` hands the bytes over with a dumper that sends
them as they are. Columns must be free of nulls (``prepare_rated`` checks that).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import polars as pl

# Element type OIDs (pg_type) and those of their array types.
TEXT_OID, TEXT_ARRAY_OID = 25, 1009
INT8_OID, INT8_ARRAY_OID = 20, 1016
INT4_OID, INT4_ARRAY_OID = 23, 1007
TIMESTAMPTZ_OID, TIMESTAMPTZ_ARRAY_OID = 1184, 1185

# PostgreSQL's timestamps count microseconds from 2000-01-01 00:00 UTC.
_PG_EPOCH_US = 946_684_800 * 1_000_000


@dataclass(frozen=True, slots=True)
class PgArray:
    """One array parameter in binary wire format, of the array type ``oid``."""

    oid: int
    data: bytes


def _header(element_oid: int, n: int) -> bytes:
    if n == 0:
        return struct.pack(">iii", 0, 0, element_oid)
    return struct.pack(">iiiii", 1, 0, element_oid, n, 1)


def _fixed(values: np.ndarray, width: int, code: str, element_oid: int, oid: int) -> PgArray:
    n = len(values)
    body = np.empty(n, dtype=np.dtype([("len", ">i4"), ("value", f">{code}{width}")]))
    body["len"] = width
    body["value"] = values
    return PgArray(oid, _header(element_oid, n) + body.tobytes())


def int8_array(column: pl.Series) -> PgArray:
    """bigint[] from an integer column."""
    values = column.cast(pl.Int64).to_numpy()
    return _fixed(values, 8, "i", INT8_OID, INT8_ARRAY_OID)


def int4_array(column: pl.Series) -> PgArray:
    """integer[] from an integer column (values must fit 32 bits)."""
    values = column.cast(pl.Int32).to_numpy()
    return _fixed(values, 4, "i", INT4_OID, INT4_ARRAY_OID)


def timestamptz_array(column: pl.Series) -> PgArray:
    """timestamptz[] from a timezone-aware Datetime column (microsecond precision)."""
    micros = column.dt.cast_time_unit("us").dt.epoch("us").to_numpy() - _PG_EPOCH_US
    return _fixed(micros, 8, "i", TIMESTAMPTZ_OID, TIMESTAMPTZ_ARRAY_OID)


def text_array(column: pl.Series) -> PgArray:
    """text[] from a String column (or any column, cast to its text form first: decimals
    travel as exact decimal text, for ``::numeric[]`` on the server)."""
    strings = column.cast(pl.String)
    n = len(strings)
    if n == 0:
        return PgArray(TEXT_ARRAY_OID, _header(TEXT_OID, 0))
    lengths = strings.str.len_bytes().cast(pl.Int64).to_numpy()
    data = np.frombuffer(strings.str.join("").item().encode(), dtype=np.uint8)
    # Element i starts at starts[i] (its 4-byte length), its bytes follow.
    sizes = lengths + 4
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    prefix = lengths.astype(">i4").view(np.uint8).reshape(n, 4)
    for k in range(4):  # four byte positions, each over the whole column
        out[starts + k] = prefix[:, k]
    if len(data):
        # Byte j of element i moves past the i + 1 length prefixes before it.
        shift = np.repeat(np.arange(4, 4 * n + 1, 4, dtype=np.int64), lengths)
        out[np.arange(len(data), dtype=np.int64) + shift] = data
    return PgArray(TEXT_ARRAY_OID, _header(TEXT_OID, n) + out.tobytes())
