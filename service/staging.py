"""Staging memory: where a batched model's requests are received, so a batch of them needs no copy.

The HTTP protocol (service/http_protocol.py) receives a request's binary input tensor straight from
the socket into a region handed out here. Consecutive requests get adjacent regions of one slab
(`max_batch_size` rows), so a batch of them is a view of the slab (`gather`) and the runner reads
the clients' bytes where they landed.

Slabs are reused, which spares the page faults of fresh memory, only once no array refers to them
any more: every view of a slab (regions, the arrays decoded from them, batches) holds a reference
to it, so its reference count says when it is free.
"""

from __future__ import annotations

import sys

import numpy as np

# Staging slabs a model keeps for reuse.
SLABS_KEPT = 4


class StagingSlabs:
    """Regions of whole rows, handed out back to back from reusable slabs of `max_rows` rows."""

    def __init__(self, row_bytes: int, max_rows: int, kept: int = SLABS_KEPT):
        if row_bytes <= 0 or max_rows <= 0:
            raise ValueError(f"staging needs rows of at least one byte and one row per slab, not "
                             f"{row_bytes} bytes x {max_rows} rows")
        self.row_bytes = row_bytes
        self.slab_bytes = row_bytes * max_rows
        self.kept = kept
        self._slab: np.ndarray | None = None  # the slab being filled
        self._used = 0
        self._slabs: list[np.ndarray] = []    # slabs to reuse once nothing refers to them

    def region(self, nbytes: int) -> np.ndarray | None:
        """Memory (uint8) for `nbytes` of input, or None when that is not whole rows of one slab."""
        rb = self.row_bytes
        if nbytes <= 0 or nbytes % rb or nbytes > self.slab_bytes:
            return None
        slab = self._slab
        if slab is None or self._used + nbytes > slab.nbytes:
            slab = self._slab = self._free_slab()
            self._used = 0
        elif self._used and sys.getrefcount(slab) == 3 + any(s is slab for s in self._slabs):
            # Nothing refers to the slab but this object (and `slab` here, and the call's argument):
            # start it over. At low concurrency every request then lands in the same memory, still
            # warm in the cache.
            self._used = 0
        region = slab[self._used:self._used + nbytes]
        self._used += nbytes
        return region

    def filling(self) -> int | None:
        """Address of the slab regions now come from (None before the first region)."""
        return None if self._slab is None else address(self._slab)

    def _free_slab(self) -> np.ndarray:
        slabs = self._slabs
        for i in range(len(slabs)):
            if sys.getrefcount(slabs[i]) == 2:  # the list's reference and the call's: free
                return slabs[i]
        slab = np.empty(self.slab_bytes, np.uint8)
        if len(slabs) < self.kept:
            slabs.append(slab)
        return slab


def gather(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays joined along the batch dimension: a view when they lie back to back in memory
    (staging regions), else a copy."""
    first = arrays[0]
    if first.flags.c_contiguous and first.size:
        end = address(first) + first.nbytes
        rows, size = first.shape[0], first.size
        for a in arrays[1:]:
            if not a.flags.c_contiguous or address(a) != end:
                break
            end += a.nbytes
            rows += a.shape[0]
            size += a.size
        else:
            # Every byte of the view belongs to one of `arrays` (same dtype and row shape: one batch
            # key), and the batch holds all of them while the runner uses the view.
            whole = np.lib.stride_tricks.as_strided(first.reshape(-1), shape=(size,), strides=(first.itemsize,))
            return whole.reshape(rows, *first.shape[1:])
    return np.concatenate(arrays)


def contiguous_runs(arrays: list[np.ndarray]) -> list[list[int]]:
    """Indices of `arrays` grouped into runs that lie back to back in memory, in address order."""
    runs: list[list[int]] = []
    end = -1
    for i in sorted(range(len(arrays)), key=lambda i: address(arrays[i])):
        a = arrays[i]
        start = address(a)
        if start == end and a.flags.c_contiguous:
            runs[-1].append(i)
        else:
            runs.append([i])
        end = start + a.nbytes
    return runs


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]
