"""The agent's on-disk spool: durability, ordering, bounds, and recovery after a crash."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from collectors.spool import (
    MAX_BATCHES_MAXIMUM,
    Spool,
    SpoolCorruptError,
    SpoolError,
    SpoolFullError,
    SpoolSettings,
)


def payload(seq: int, size: int = 10) -> bytes:
    return f"batch-{seq}-".encode().ljust(size, b".")


def test_appended_batches_survive_a_crash_in_order_with_the_same_seq_and_bytes(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, "agent-1")
    seqs = [spool.append(payload) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    spool.ack(2)
    del spool  # a crash: the object is dropped without close(); the lock goes with it
    gc.collect()

    again = Spool(tmp_path, "agent-1")
    assert again.pending() == [1, 3, 4, 5]
    assert [again.read(s) for s in again.pending()] == [payload(s) for s in (1, 3, 4, 5)]
    assert again.next_seq == 6
    assert again.append(payload) == 6
    assert again.bytes_used == sum(len(payload(s)) for s in (1, 3, 4, 5, 6))


def test_a_seq_is_never_reused_even_when_every_batch_was_acked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1")
    for _ in range(3):
        spool.ack(spool.append(payload))
    assert len(spool) == 0
    spool.close()
    assert Spool(tmp_path, "agent-1").next_seq == 4


def test_next_seq_is_above_every_spooled_batch_even_if_the_state_file_lags(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, "agent-1")
    for _ in range(4):
        spool.append(payload)
    spool.close()
    state = tmp_path / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "next_seq": 2}))
    assert Spool(tmp_path, "agent-1").next_seq == 5


def test_an_unfinished_write_is_removed_and_its_seq_stays_burnt(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1")
    spool.append(payload)
    spool.close()
    # a crash between step 1 (state: next_seq = 3) and the rename of batch 2
    state = tmp_path / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "next_seq": 3}))
    (tmp_path / "batches" / f"{2:020d}.batch.tmp").write_bytes(b"half")
    again = Spool(tmp_path, "agent-1")
    assert again.pending() == [1]
    assert again.next_seq == 3
    assert not list(tmp_path.glob("**/*.tmp"))


def test_full_spool_refuses_and_changes_nothing_until_an_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1", SpoolSettings(max_batches=2, max_bytes=10_000))
    spool.append(payload)
    spool.append(payload)
    assert not spool.has_room()
    with pytest.raises(SpoolFullError, match="2/2 batches"):
        spool.append(payload)
    assert spool.next_seq == 3
    assert spool.pending() == [1, 2]  # nothing dropped
    spool.ack(1)
    assert spool.append(payload) == 3


def test_byte_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1", SpoolSettings(max_batches=100, max_bytes=25))
    spool.append(lambda seq: payload(seq, 10))
    spool.append(lambda seq: payload(seq, 10))
    with pytest.raises(SpoolFullError, match="bytes"):
        spool.append(lambda seq: payload(seq, 10))
    assert spool.append(lambda _seq: b"x" * 5) == 3  # exactly at the bound fits
    assert spool.bytes_used == 25


def test_next_after_walks_the_unacked_batches_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1")
    for _ in range(4):
        spool.append(payload)
    spool.ack(2)
    assert spool.next_after(0) == 1
    assert spool.next_after(1) == 3
    assert spool.next_after(4) is None
    spool.ack(2)  # a repeated ack is a no-op
    with pytest.raises(KeyError, match="seq 2"):
        spool.read(2)


def test_one_process_per_spool_and_one_agent_per_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1")
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, "agent-1")
    spool.close()
    with pytest.raises(SpoolError, match="belongs to agent 'agent-1', not 'agent-2'"):
        Spool(tmp_path, "agent-2")


def test_a_damaged_batch_file_is_reported_not_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "agent-1")
    spool.append(payload)
    spool.close()
    path = tmp_path / "batches" / f"{1:020d}.batch"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SpoolCorruptError, match=f"{path.name}: checksum mismatch"):
        Spool(tmp_path, "agent-1")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batches": 0}, "max_batches"),
        ({"max_batches": MAX_BATCHES_MAXIMUM + 1}, "max_batches"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_settings_have_bounds(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpoolSettings(**changes)  # type: ignore[arg-type]
