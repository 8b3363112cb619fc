"""The shared arithmetic (mpbook.units), without engines: bytes as text, shard sizes exactly
as torch.chunk and DTensor cut, even splits of prompts and layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mpbook.units import divisors, format_bytes, shard_range, shard_size, split_evenly


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 2**20, "5.0 MiB"),
        (24 * 2**30, "24.0 GiB"),
        (3 * 2**40, "3072.0 GiB"),  # GiB is the largest unit
        (-2048, "-2.0 KiB"),
        (None, "-"),
    ],
)
def test_format_bytes_takes_the_largest_unit_the_number_reaches(n, text):
    assert format_bytes(n) == text


def test_format_bytes_in_a_given_unit_for_columns_that_share_one():
    assert format_bytes(512 * 2**20, unit="GiB") == "0.5 GiB"
    assert format_bytes(3 * 2**30, unit="MiB") == "3072.0 MiB"
    assert format_bytes(1536.7, unit="B") == "1536 B"
    assert format_bytes(None, unit="GiB") == "-"
    with pytest.raises(KeyError):
        format_bytes(1, unit="kB")


@given(total=st.integers(0, 300), parts=st.integers(1, 12))
def test_shards_are_torch_chunks(total, parts):
    chunks = torch.arange(total).chunk(parts) if total else ()
    sizes = [shard_size(total, parts, i) for i in range(parts)]
    ranges = [shard_range(total, parts, i) for i in range(parts)]
    # torch.chunk leaves out empty pieces at the end; a shard there is empty
    assert sizes[: len(chunks)] == [len(c) for c in chunks]
    assert all(size == 0 for size in sizes[len(chunks):])
    assert [list(r) for r in ranges[: len(chunks)]] == [c.tolist() for c in chunks]
    assert sum(sizes) == total and [i for r in ranges for i in r] == list(range(total))


def test_shard_size_matches_what_a_dtensor_holds():
    # DTensor's Shard placement uses torch.chunk: 259 vocabulary rows over 2 ranks
    assert [shard_size(259, 2, i) for i in range(2)] == [130, 129]
    assert [shard_size(5, 4, i) for i in range(4)] == [2, 2, 1, 0]
    assert shard_range(5, 4, 3) == range(5, 5)


@given(total=st.integers(0, 200), parts=st.integers(1, 20))
def test_split_evenly_gives_the_items_back_in_order_earlier_parts_larger(total, parts):
    pieces = split_evenly(total, parts)
    assert len(pieces) == parts
    assert [i for piece in pieces for i in piece] == list(range(total))
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_evenly_examples():
    assert split_evenly(5, 2) == [range(0, 3), range(3, 5)]
    assert split_evenly(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]


def test_divisors():
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(1) == [1]
    assert divisors(7) == [1, 7]
