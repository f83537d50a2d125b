"""Staging memory (service/staging.py) on its own: regions of whole rows, back to back, in slabs
reused only once nothing refers to them."""

from __future__ import annotations

import numpy as np
import pytest

from service.staging import StagingSlabs, address, contiguous_runs, gather

ROW = 64  # bytes: one row of 16 float32


def test_regions_are_whole_rows_back_to_back():
    slabs = StagingSlabs(ROW, max_rows=16)
    first, second = slabs.region(ROW), slabs.region(3 * ROW)
    assert first.dtype == np.uint8 and first.nbytes == ROW and second.nbytes == 3 * ROW
    assert address(second) == address(first) + ROW == slabs.filling() + ROW
    assert slabs.region(0) is None and slabs.region(-ROW) is None
    assert slabs.region(ROW + 1) is None          # not whole rows
    assert slabs.region(17 * ROW) is None         # more than one slab
    assert slabs.region(16 * ROW) is not None     # exactly one slab


def test_slabs_are_reused_only_when_nothing_refers_to_them():
    slabs = StagingSlabs(ROW, max_rows=16, kept=4)
    held = [slabs.region(ROW)]
    first = slabs.filling()
    while slabs.filling() == first:  # fill the rest of the first slab (kept alive by `held`)
        held.append(slabs.region(ROW))
    held = held[:1]  # one region of the first slab stays referred to
    for _ in range(8):
        slabs.region(16 * ROW)  # whole slabs: never the first one while `held` refers to it
        assert slabs.filling() != first
    del held
    reused = [slabs.filling() == first for _ in range(8) if slabs.region(16 * ROW) is not None]
    assert any(reused), "a slab nothing refers to was not reused"


def test_a_slab_nothing_refers_to_starts_over():
    """At low concurrency the same (cached) memory is used again and again."""
    slabs = StagingSlabs(ROW, max_rows=16)
    one = slabs.region(ROW)
    held = slabs.region(ROW)
    assert address(held) == slabs.filling() + ROW  # `one` is still referred to
    del one, held
    assert address(slabs.region(ROW)) == slabs.filling()


def test_arrays_decoded_from_a_region_keep_its_slab_busy():
    slabs = StagingSlabs(ROW, max_rows=4)
    decoded = np.frombuffer(slabs.region(ROW), np.float32).reshape(1, 16)
    assert address(slabs.region(ROW)) == address(decoded) + ROW  # not started over under `decoded`


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        StagingSlabs(0, 16)
    with pytest.raises(ValueError):
        StagingSlabs(ROW, 0)


def test_gather_is_a_view_for_adjacent_regions_and_a_copy_otherwise():
    slabs = StagingSlabs(ROW, max_rows=16)
    arrays = []
    for i, n in enumerate((1, 3, 2)):
        a = np.frombuffer(slabs.region(n * ROW), np.float32).reshape(n, 16)
        a[...] = i + np.arange(n * 16, dtype=np.float32).reshape(n, 16)
        arrays.append(a)
    joined = gather(arrays)
    assert joined.shape == (6, 16) and np.shares_memory(joined, arrays[0])
    np.testing.assert_array_equal(joined, np.concatenate(arrays))
    mixed = gather([arrays[0], np.ones((2, 16), np.float32)])
    assert not np.shares_memory(mixed, arrays[0])
    np.testing.assert_array_equal(mixed, np.concatenate([arrays[0], np.ones((2, 16), np.float32)]))


def test_contiguous_runs_follow_addresses_not_list_order():
    slabs = StagingSlabs(ROW, max_rows=8)
    a, b, c = (np.frombuffer(slabs.region(ROW), np.float32) for _ in range(3))
    slabs.region(ROW)  # a gap
    d = np.frombuffer(slabs.region(ROW), np.float32)
    assert contiguous_runs([c, a, d, b]) == [[1, 3, 0], [2]]
