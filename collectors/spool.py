"""A bounded on-disk spool of an agent's batches: persisted before they are sent, deleted once
acked, never reusing a ``seq`` for different content.

Layout of the spool directory (one agent per directory, held with an exclusive ``flock``)::

    lock                      flock'ed while a Spool object is open
    state.json                {"format", "agent_id", "next_seq"}: written atomically
    batches/<seq:020d>.batch  one file per unacked batch: header + the batch bytes

A batch file is ``MAGIC (8 bytes) | seq (u64 BE) | crc32 of payload (u32 BE) | payload``.

Write order of :meth:`Spool.append` (each step durable before the next: write to a ``.tmp``,
``fsync``, ``rename``, ``fsync`` the directory):

1. ``state.json`` with ``next_seq = seq + 1`` -- the seq is burnt before anything carries it,
   so a crash at any later point can leave a gap in the seqs, never a reuse;
2. the batch file.

Only then may the batch be sent. :meth:`Spool.ack` deletes the file (no fsync: if the delete
is lost in a crash, the batch is sent again with the same ``(agent_id, seq)``, which rating
deduplicates). On open, ``next_seq`` is ``max(state, highest spooled seq + 1)``; leftover
``.tmp`` files (a crash mid-write, never sent) are removed; a batch file whose header or
checksum is wrong raises :class:`SpoolCorruptError` naming the file (it is never skipped
silently).

Bounds: ``max_batches`` and ``max_bytes`` (payload bytes), settings with maxima. A full spool
refuses :meth:`append` with :class:`SpoolFullError`; it never drops a batch. What to do then
is the caller's policy (the daemon stops taking readings; see ``agent_daemon``).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import struct
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_log = logging.getLogger(__name__)

SPOOL_FORMAT = "meterline.agent_spool.v1"
MAGIC = b"MLSPOOL1"
_HEADER = struct.Struct(">8sQI")  # magic, seq, crc32
MAX_BATCHES_MAXIMUM = 1_000_000
MAX_BYTES_MAXIMUM = 16 * 1024**3  # 16 GiB
_SUFFIX = ".batch"


class SpoolError(RuntimeError):
    """The spool cannot be used (locked by another process, another agent's, unreadable)."""


class SpoolCorruptError(SpoolError):
    """A spooled batch file is damaged; the message names it. Nothing is skipped silently."""


class SpoolFullError(SpoolError):
    """The spool is at one of its bounds; the batch was not spooled (nor was its seq used)."""


@dataclass(frozen=True, slots=True)
class SpoolSettings:
    max_batches: int = 10_000  # unacked batches kept on disk
    max_bytes: int = 256 * 1024**2  # payload bytes of unacked batches (256 MiB)
    fsync: bool = True  # off only for benchmarks/tests that do not simulate power loss

    def __post_init__(self) -> None:
        if not 1 <= self.max_batches <= MAX_BATCHES_MAXIMUM:
            raise ValueError(
                f"max_batches must be in [1, {MAX_BATCHES_MAXIMUM}], got {self.max_batches}"
            )
        if not 1 <= self.max_bytes <= MAX_BYTES_MAXIMUM:
            raise ValueError(f"max_bytes must be in [1, {MAX_BYTES_MAXIMUM}], got {self.max_bytes}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the descriptor releases the flock


class Spool:
    """``seq = spool.append(lambda seq: batch_bytes)``, ``spool.read(seq)``, ``spool.ack(seq)``."""

    def __init__(
        self, directory: Path, agent_id: str, settings: SpoolSettings | None = None
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        self.directory = directory
        self.agent_id = agent_id
        self.settings = settings if settings is not None else SpoolSettings()
        self._batches = directory / "batches"
        self._batches.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise SpoolError(f"spool {directory} is in use by another agent process") from None
        self._closer = weakref.finalize(self, _release, lock_fd)
        try:
            self._seqs: list[int] = []  # unacked, ascending
            self._sizes: dict[int, int] = {}  # seq -> payload bytes
            self.bytes_used = 0
            self._next_seq = self._load()
        except BaseException:
            self._closer()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _load(self) -> int:
        state_path = self.directory / "state.json"
        next_seq = 1
        if state_path.exists():
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError) as exc:
                raise SpoolCorruptError(f"{state_path}: unreadable: {exc}") from None
            if state.get("format") != SPOOL_FORMAT or not isinstance(state.get("next_seq"), int):
                raise SpoolCorruptError(f"{state_path}: not a {SPOOL_FORMAT} state file")
            if state.get("agent_id") != self.agent_id:
                raise SpoolError(
                    f"spool {self.directory} belongs to agent {state.get('agent_id')!r}, "
                    f"not {self.agent_id!r}"
                )
            next_seq = state["next_seq"]
        for leftover in self.directory.glob("**/*.tmp"):  # a crash mid-write: never sent
            _log.warning("spool %s: removing unfinished write %s", self.directory, leftover.name)
            leftover.unlink()
        for path in sorted(self._batches.glob(f"*{_SUFFIX}")):  # a loop per batch file
            seq = self._check(path)
            self._seqs.append(seq)
            size = path.stat().st_size - _HEADER.size
            self._sizes[seq] = size
            self.bytes_used += size
        self._seqs.sort()
        if self._seqs:
            next_seq = max(next_seq, self._seqs[-1] + 1)
            _log.info(
                "spool %s: %d unacked batches (seq %d..%d) to resend",
                self.directory,
                len(self._seqs),
                self._seqs[0],
                self._seqs[-1],
            )
        if not state_path.exists():
            self._persist_next_seq(next_seq)  # claims the directory for this agent
        return next_seq

    def _path(self, seq: int) -> Path:
        return self._batches / f"{seq:020d}{_SUFFIX}"

    def _check(self, path: Path) -> int:
        raw = path.read_bytes()
        if len(raw) < _HEADER.size:
            raise SpoolCorruptError(f"{path}: truncated ({len(raw)} bytes)")
        magic, seq, crc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SpoolCorruptError(f"{path}: not a spooled batch (bad magic)")
        if path.name != self._path(seq).name:
            raise SpoolCorruptError(f"{path}: header says seq {seq}")
        if zlib.crc32(raw[_HEADER.size :]) != crc:
            raise SpoolCorruptError(f"{path}: checksum mismatch")
        return int(seq)

    # -- writing ----------------------------------------------------------------------------

    def _write_atomically(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.settings.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        if self.settings.fsync:
            _fsync_dir(path.parent)

    def _persist_next_seq(self, next_seq: int) -> None:
        state = {"format": SPOOL_FORMAT, "agent_id": self.agent_id, "next_seq": next_seq}
        self._write_atomically(self.directory / "state.json", json.dumps(state).encode())

    def has_room(self, payload_bytes: int = 0) -> bool:
        return (
            len(self._seqs) < self.settings.max_batches
            and self.bytes_used + payload_bytes <= self.settings.max_bytes
        )

    def append(self, build: Callable[[int], bytes]) -> int:
        """Spool the batch ``build(seq)`` under the next seq; durable when this returns.

        ``build`` must be pure (it is called before the seq is reserved). Raises
        :class:`SpoolFullError` if the batch does not fit; then nothing changed.
        """
        seq = self._next_seq
        payload = build(seq)
        if not self.has_room(len(payload)):
            raise SpoolFullError(
                f"spool {self.directory} is full: {len(self._seqs)}/{self.settings.max_batches} "
                f"batches, {self.bytes_used}+{len(payload)}/{self.settings.max_bytes} bytes"
            )
        self._persist_next_seq(seq + 1)  # 1. burn the seq
        self._next_seq = seq + 1
        header = _HEADER.pack(MAGIC, seq, zlib.crc32(payload))
        self._write_atomically(self._path(seq), header + payload)  # 2. the batch
        self._seqs.append(seq)
        self._sizes[seq] = len(payload)
        self.bytes_used += len(payload)
        return seq

    def ack(self, seq: int) -> None:
        """The collector acked ``seq``: forget it (a repeated ack is a no-op)."""
        size = self._sizes.pop(seq, None)
        if size is None:
            return
        del self._seqs[bisect.bisect_left(self._seqs, seq)]
        self.bytes_used -= size
        self._path(seq).unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def __len__(self) -> int:
        return len(self._seqs)

    def pending(self) -> list[int]:
        """The unacked seqs, oldest first."""
        return list(self._seqs)

    def next_after(self, seq: int) -> int | None:
        """The oldest unacked seq greater than ``seq``, if any."""
        i = bisect.bisect_right(self._seqs, seq)
        return self._seqs[i] if i < len(self._seqs) else None

    def read(self, seq: int) -> bytes:
        """The payload of an unacked batch (checked against its header)."""
        if seq not in self._sizes:
            raise KeyError(f"seq {seq} is not in spool {self.directory}")
        path = self._path(seq)
        raw = path.read_bytes()
        _, stored_seq, crc = _HEADER.unpack_from(raw)
        payload = raw[_HEADER.size :]
        if stored_seq != seq or zlib.crc32(payload) != crc:
            raise SpoolCorruptError(f"{path}: damaged since it was written")
        return payload

    def close(self) -> None:
        """Release the directory lock (also done when the object is garbage-collected)."""
        self._closer()
