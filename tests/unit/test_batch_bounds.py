"""Batches bounded by bytes as well as by count: the cut, and the worker's parts of a delivery.

A Kafka worker takes up to 500 messages per batch and applied them in one transaction; messages
of up to a megabyte each (and payload-less ones whose events are read back whole from the store)
made that hundreds of megabytes at once. It now applies a delivery in parts of bounded bytes.
"""

from __future__ import annotations

from adapters.eventlog import MAX_BATCH_BYTES, byte_bounded
from domain.envelope import OMITTED
from streams.worker import delivered_parts


def test_runs_are_cut_before_the_item_that_passes_the_bound_and_a_larger_item_goes_alone() -> None:
    assert list(byte_bounded([3, 3, 3, 9, 1, 1], lambda n: n, 6)) == [[3, 3], [3], [9], [1, 1]]
    assert list(byte_bounded([], len, 6)) == []


def test_a_delivered_batch_is_applied_in_parts_of_bounded_bytes() -> None:
    half = b"x" * (MAX_BATCH_BYTES // 2)
    # Published without its payload: its event, read from the store, may be any size.
    omitted = b'{"metadata": {"' + OMITTED.encode() + b'": "2000000 bytes"}}'
    parts = [list(part) for part in delivered_parts([half, half, half, b"s", omitted, b"t"])]
    assert parts == [[half, half], [half, b"s"], [omitted], [b"t"]]
