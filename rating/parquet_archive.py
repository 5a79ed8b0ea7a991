"""The raw-batch archive on disk as Parquet: the only module writing (and reading) it.

Layout: ``{root}/{topic}/p{partition}/{first offset:020d}-{last offset:020d}.parquet``, one
file per (topic, partition) of each poll, holding that poll's accepted records of the
partition (``rating.archive.ARCHIVE_SCHEMA``). The name is the offset range, so:

- a file is written to a temporary name in its directory, fsynced, renamed into place and
  the directory fsynced: a reader never sees half a file, and a crash leaves at most a
  ``.tmp-*`` file behind (ignored by readers);
- a replay of the same poll finds its file already there and writes nothing; a replay
  whose poll fell differently (after a crash the consumer may fetch more or fewer records)
  writes a file whose range overlaps another: readers keep each (topic, partition, offset)
  once, so the archive still holds every record exactly once.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import polars as pl

from rating.archive import ARCHIVE_SCHEMA
from rating.engine import HOUR_S

# Kafka's legal topic names; anything else must not become a directory name.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_FILE = re.compile(r"\d{20}-\d{20}\.parquet")


def _check_topic(topic: str) -> None:
    if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
        raise ValueError(f"topic {topic!r} is not a legal Kafka topic name")


def archive_path(root: Path, topic: str, partition: int, first: int, last: int) -> Path:
    _check_topic(topic)
    return root / topic / f"p{partition}" / f"{first:020d}-{last:020d}.parquet"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetArchive:
    """A ``RawArchive`` in a directory (created when missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def write(self, records: pl.DataFrame) -> int:
        if records.schema != pl.Schema(ARCHIVE_SCHEMA):
            raise ValueError(f"archive frame does not match ARCHIVE_SCHEMA: {dict(records.schema)}")
        written = 0
        for (topic, partition), part in records.sort("offset").group_by(
            "topic", "partition", maintain_order=True
        ):
            assert isinstance(topic, str)
            assert isinstance(partition, int)
            offsets = part.get_column("offset")
            first, last = offsets.min(), offsets.max()
            assert isinstance(first, int)
            assert isinstance(last, int)
            target = archive_path(self.root, topic, partition, first, last)
            if target.exists():
                continue  # the same poll replayed: the same records are already there
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
            try:
                with temporary.open("wb") as out:
                    part.write_parquet(out, compression="zstd", statistics=True)
                    out.flush()
                    os.fsync(out.fileno())
                temporary.replace(target)
            finally:
                temporary.unlink(missing_ok=True)
            _fsync_dir(target.parent)
            written += 1
        return written


def archive_files(root: Path, topic: str) -> list[Path]:
    """The archive files of ``topic``, sorted by partition and offset range."""
    _check_topic(topic)
    base = root / topic
    if not base.is_dir():
        return []
    files = [
        f
        for d in base.iterdir()
        if d.is_dir() and d.name.startswith("p") and d.name[1:].isdigit()
        for f in d.iterdir()
        if _FILE.fullmatch(f.name)
    ]
    return sorted(files, key=lambda f: (int(f.parent.name[1:]), f.name))


def read_archive(
    root: Path, topic: str, start_unix_s: int | None = None, end_unix_s: int | None = None
) -> pl.DataFrame:
    """Archived records of ``topic`` (ARCHIVE_SCHEMA) whose samples may touch an hour of
    ``[start_unix_s, end_unix_s)`` (both hour-aligned; None: unbounded), each Kafka position
    once, sorted by topic, partition, offset."""
    for name, bound in (("start", start_unix_s), ("end", end_unix_s)):
        if bound is not None and bound % HOUR_S:
            raise ValueError(f"{name} {bound} is not on a whole hour")
    files = archive_files(root, topic)
    if not files:
        return pl.DataFrame(schema=ARCHIVE_SCHEMA)
    scan = pl.scan_parquet(files, schema=pl.Schema(ARCHIVE_SCHEMA))
    if start_unix_s is not None:
        scan = scan.filter(pl.col("last_end_unix_s") >= start_unix_s)
    if end_unix_s is not None:
        scan = scan.filter(pl.col("first_start_unix_s") < end_unix_s)
    return (
        scan.unique(["topic", "partition", "offset"], keep="first")
        .sort("topic", "partition", "offset")
        .collect()
    )
