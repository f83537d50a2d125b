"""The capture store: one SQLite file, bounded in bytes on disk, oldest samples out first.

Why SQLite (stdlib `sqlite3`) rather than Parquet: samples arrive one at a time from a background
thread and are evicted oldest-first under a byte cap; SQLite does both with a transaction and a
DELETE and reuses the freed pages in place, where Parquet files are immutable (eviction rewrites
files) and would add pyarrow to the serving core. Analysts open it with the `sqlite3` shell,
pandas (`read_sql`), DuckDB or DB Browser; tensors are `.npy` blobs (`numpy.load(io.BytesIO(b))`),
metadata JSON text.

Tables:
  samples(id, model, version, request_id, time, latency_s, bytes, meta)     one captured request
  tensors(sample_id, role, name, npy)     role: input | output; one row per tensor
  labels(id, model, version, request_id, time, npy)          feedback received for a stored sample
  drift(id, model, version, time, rows, detected, min_p_value, max_ks, max_psi, detail)
  live(id, model, version, time, metric, value, n)                           live accuracy / MAE
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FILENAME = "capture.sqlite"
# History tables (drift, live) keep at most this many rows per model version.
HISTORY_ROWS = 10_000
# A history table is counted (and trimmed) after this share of its limit was written since.
TRIM_EVERY = 0.05
# Room a drift history row is given before a write's eviction check (its detail JSON: the worst
# features and up to 20 drifted names).
DRIFT_ROW_BYTES = 512

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL,
    request_id TEXT NOT NULL, time REAL NOT NULL, latency_s REAL NOT NULL, bytes INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS samples_model ON samples (model, version, id);
CREATE INDEX IF NOT EXISTS samples_request ON samples (request_id);
CREATE TABLE IF NOT EXISTS tensors (
    sample_id INTEGER NOT NULL REFERENCES samples (id) ON DELETE CASCADE, role TEXT NOT NULL,
    name TEXT NOT NULL, npy BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS tensors_sample ON tensors (sample_id);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL,
    request_id TEXT NOT NULL, time REAL NOT NULL, npy BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS labels_request ON labels (model, request_id);
CREATE TABLE IF NOT EXISTS drift (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL, time REAL NOT NULL,
    rows INTEGER NOT NULL, detected INTEGER NOT NULL, min_p_value REAL, max_ks REAL, max_psi REAL,
    detail TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS drift_model ON drift (model, version, id);
CREATE TABLE IF NOT EXISTS live (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT NOT NULL, time REAL NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL, n INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS live_model ON live (model, version, id);
"""

# Tensor bytes per model version, kept by triggers in the same transactions as the samples (so
# every process writing the file agrees): the size gauge reads a few rows, not a SUM over up to
# hundreds of thousands of samples every TICK_S.
SAMPLE_BYTES = (
    ("CREATE TABLE sample_bytes (model TEXT NOT NULL, version TEXT NOT NULL, bytes INTEGER NOT NULL, "
     "PRIMARY KEY (model, version))"),
    "INSERT INTO sample_bytes SELECT model, version, SUM(bytes) FROM samples GROUP BY model, version",
    ("CREATE TRIGGER sample_bytes_insert AFTER INSERT ON samples BEGIN "
     "INSERT INTO sample_bytes (model, version, bytes) VALUES (NEW.model, NEW.version, NEW.bytes) "
     "ON CONFLICT (model, version) DO UPDATE SET bytes = bytes + excluded.bytes; END"),
    ("CREATE TRIGGER sample_bytes_delete AFTER DELETE ON samples BEGIN "
     "UPDATE sample_bytes SET bytes = bytes - OLD.bytes WHERE model = OLD.model AND version = OLD.version; END"),
)


@lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def to_npy(arr: np.ndarray) -> bytes:
    """The bytes np.save writes (format 1.0), its header built once per dtype and shape: np.save
    formats it again for every tensor, which was most of the cost of writing a sample."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:  # BYTES: np.save's own checks and error
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        return buf.getvalue()
    return _npy_header(np.lib.format.dtype_to_descr(arr.dtype), arr.shape) + arr.tobytes()


def from_npy(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


@dataclass
class Sample:
    """One captured request, as the background worker writes it."""

    model: str
    version: str
    request_id: str
    time: float          # Unix seconds when the outputs were ready
    latency_s: float     # server-side, body received → outputs ready (its batch done)
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


@dataclass
class StoredSample:
    id: int
    model: str
    version: str
    request_id: str
    time: float
    latency_s: float
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    label: np.ndarray | None


class DriftRow(NamedTuple):
    """One drift evaluation, as the history keeps it (`kiln monitor report`)."""

    model: str
    version: str
    time: float
    rows: int
    detected: bool
    min_p_value: float
    max_ks: float
    max_psi: float
    detail: dict[str, Any]


class CaptureStore:
    """SQLite at `folder/capture.sqlite`, bounded: the file on disk stays under `max_bytes`.
    Writes come from one thread (the capture worker); readers (CLI, tests) may open the same file
    at the same time."""

    def __init__(self, folder: Path, max_bytes: int, readonly: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / FILENAME
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._backlog: list[tuple[str, str]] = []  # samples evicted by history writes, reported by insert()
        self.history_rows = HISTORY_ROWS
        self._unchecked: dict[tuple[str, str | None, str | None], int] = {}  # rows written since the last trim
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no capture store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            # A rollback journal, not WAL: WAL's -wal and -shm files would count against a small cap.
            # Readers (kiln monitor, sqlite3, pandas) take short shared locks; the writer waits up
            # to 10 s for them (the worker then falls behind, and a full queue drops samples).
            self.db.execute("PRAGMA journal_mode=DELETE")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.executescript(SCHEMA)
            self.db.execute("BEGIN IMMEDIATE")  # one writer creates the totals (from the rows of an older file)
            try:
                if self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sample_bytes'").fetchone() is None:
                    for statement in SAMPLE_BYTES:
                        self.db.execute(statement)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    # -- size ---------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Bytes of the store's files on disk (the database, and its journal during a write)."""
        return sum(p.stat().st_size for p in self.folder.glob(FILENAME + "*") if p.exists())

    def _used_bytes(self) -> int:
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        count = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return (count - free) * page

    def bytes_by_model(self) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self.db.execute("SELECT model, version, bytes FROM sample_bytes").fetchall()
        return {(m, v): int(b or 0) for m, v, b in rows}

    # -- writes (the capture worker) ------------------------------------------------------------
    def insert(self, samples: Iterable[Sample], drift: list[DriftRow] = ()) -> tuple[int, list[tuple[str, str]], list[Sample]]:
        """Write samples in transactions of at most a tenth of the cap each, the oldest samples
        evicted before each one so that the files never pass the cap, and drift history rows in the
        first of them (one commit for both; drift rows alone when there are no samples). Returns (rows written, (model, version) of each evicted
        sample, samples too large to keep: over a quarter of the cap)."""
        n, too_large = 0, []
        chunk: list[tuple[Sample, list[tuple[str, str, bytes]], int]] = []
        size = 0
        with self._lock:
            evicted, self._backlog = self._backlog, []
            for s in samples:
                blobs = [("input", k, to_npy(v)) for k, v in s.inputs.items()]
                blobs += [("output", k, to_npy(v)) for k, v in s.outputs.items()]
                nbytes = sum(len(b) for _, _, b in blobs)
                if nbytes > self.max_bytes // 4:
                    too_large.append(s)
                    continue
                chunk.append((s, blobs, nbytes))
                size += nbytes
                if size >= self.max_bytes // 10:
                    n += self._write(chunk, size, evicted, drift)
                    chunk, size, drift = [], 0, ()
            if chunk or drift:
                n += self._write(chunk, size, evicted, drift)
        return n, evicted, too_large

    def _write(self, chunk, size: int, evicted: list[tuple[str, str]], drift: list[DriftRow] = ()) -> int:
        evicted += self._evict(incoming=size + DRIFT_ROW_BYTES * len(drift))
        self.db.execute("BEGIN")
        try:
            if drift:
                self.db.executemany("INSERT INTO drift (model, version, time, rows, detected, min_p_value, max_ks, "
                                    "max_psi, detail) VALUES (?,?,?,?,?,?,?,?,?)",
                                    [(r.model, r.version, r.time, r.rows, int(r.detected), r.min_p_value, r.max_ks,
                                      r.max_psi, json.dumps(r.detail)) for r in drift])
                for key, count in Counter((r.model, r.version) for r in drift).items():
                    self._trim("drift", *key, written=count)
            for s, blobs, nbytes in chunk:
                cur = self.db.execute(
                    "INSERT INTO samples (model, version, request_id, time, latency_s, bytes) VALUES (?,?,?,?,?,?)",
                    (s.model, s.version, s.request_id, s.time, s.latency_s, nbytes))
                self.db.executemany("INSERT INTO tensors (sample_id, role, name, npy) VALUES (?,?,?,?)",
                                    [(cur.lastrowid, role, name, blob) for role, name, blob in blobs])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(chunk)

    def _evict(self, incoming: int = 0) -> list[tuple[str, str]]:
        """Oldest rows out until the database's pages in use are under 70% of the
        cap, once it passes 85%; freed pages are reused by the next inserts, so the file stops
        growing there. Samples go first; the drift / live / label history (small rows) is trimmed
        when it holds more than half of what is in use, or when no sample is left."""
        high, low = int(self.max_bytes * 0.85) - incoming, int(self.max_bytes * 0.7) - incoming
        if self._used_bytes() <= high:
            return []
        evicted: list[tuple[str, str]] = []
        while (used := self._used_bytes()) > low:
            history_first = self._history_bytes() > used // 2
            if (history_first or not self._trim_samples(used - low, evicted)) and not self._trim_history():
                break
        return evicted

    def _trim_samples(self, need: int, evicted: list[tuple[str, str]]) -> bool:
        """Delete the oldest samples holding about `need` bytes of tensors (at least one)."""
        ids, freed = [], 0
        for sid, model, version, nbytes in self.db.execute("SELECT id, model, version, bytes FROM samples ORDER BY id"):
            ids.append(sid)
            evicted.append((model, version))
            freed += nbytes + 200
            if freed >= need:
                break
        if not ids:
            return False
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM samples WHERE id = ?", [(i,) for i in ids])
        self.db.execute("COMMIT")
        return True

    def _history_bytes(self) -> int:
        (drift,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(detail)) + COUNT(*) * 96, 0) FROM drift").fetchone()
        (live,) = self.db.execute("SELECT COUNT(*) * 64 FROM live").fetchone()
        (labels,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(npy)) + COUNT(*) * 64, 0) FROM labels").fetchone()
        return drift + live + labels

    def _trim_history(self) -> bool:
        """The oldest tenth of each history table (labels, drift, live); False when all are empty."""
        removed = 0
        self.db.execute("BEGIN")
        for table in ("labels", "drift", "live"):
            (count,) = self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
            if count:
                cur = self.db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)",
                                      (max(1, count // 10),))
                removed += cur.rowcount
        self.db.execute("COMMIT")
        return removed > 0

    def add_labels(self, rows: Iterable[tuple[str, str, str, float, np.ndarray]]) -> None:
        rows = list(rows)
        with self._lock:
            self.db.execute("BEGIN")
            # Only for samples still in the store: a label is kept to be exported with its sample.
            self.db.executemany("INSERT INTO labels (model, version, request_id, time, npy) SELECT ?,?,?,?,? "
                                "WHERE EXISTS (SELECT 1 FROM samples WHERE request_id = ? AND model = ?)",
                                [(m, v, rid, t, to_npy(label), rid, m) for m, v, rid, t, label in rows])
            self._trim("labels", None, None, limit=200_000, written=len(rows))
            self.db.execute("COMMIT")
            self._backlog += self._evict(incoming=4096)

    def add_live(self, model: str, version: str, time: float, metric: str, value: float, n: int) -> None:
        with self._lock:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO live (model, version, time, metric, value, n) VALUES (?,?,?,?,?,?)",
                            (model, version, time, metric, value, n))
            self._trim("live", model, version, written=1)
            self.db.execute("COMMIT")

    def _trim(self, table: str, model: str | None, version: str | None, limit: int | None = None,
              written: int = 1) -> None:
        """Keep a history table at about `limit` rows (per model version; default history_rows):
        counted only once TRIM_EVERY of the limit was written since the last count (by this
        process; other workers writing the same file count their own), not at every row."""
        limit = self.history_rows if limit is None else limit
        key = (table, model, version)
        unchecked = self._unchecked.get(key, limit) + written  # a first write counts at once
        if unchecked < limit * TRIM_EVERY:
            self._unchecked[key] = unchecked
            return
        self._unchecked[key] = 0
        where, args = ("WHERE model = ? AND version = ?", (model, version)) if model is not None else ("", ())
        (count,) = self.db.execute(f"SELECT COUNT(*) FROM {table} {where}", args).fetchone()
        if count > limit:
            self.db.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} {where} ORDER BY id LIMIT ?)",
                            (*args, count - limit))

    # -- reads (CLI, tests) -----------------------------------------------------------------------
    def models(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return self.db.execute("SELECT model, version, COUNT(*) FROM samples GROUP BY model, version "
                                   "ORDER BY model, CAST(version AS INTEGER)").fetchall()

    def samples(self, model: str, version: str | None = None, limit: int | None = None) -> Iterator[StoredSample]:
        """Captured samples of a model (every version unless one is given), oldest first, each with
        the last label received for its request id (None when no feedback came)."""
        q = "SELECT id, model, version, request_id, time, latency_s FROM samples WHERE model = ?"
        args: list[Any] = [model]
        if version is not None:
            q += " AND version = ?"
            args.append(version)
        q += " ORDER BY id"
        if limit:
            q += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self.db.execute(q, args).fetchall()
        for sid, m, v, rid, t, lat in rows:
            with self._lock:
                tensors = self.db.execute("SELECT role, name, npy FROM tensors WHERE sample_id = ?", (sid,)).fetchall()
                label = self.db.execute("SELECT npy FROM labels WHERE model = ? AND request_id = ? ORDER BY id DESC "
                                        "LIMIT 1", (m, rid)).fetchone()
            ins = {n: from_npy(b) for role, n, b in tensors if role == "input"}
            outs = {n: from_npy(b) for role, n, b in tensors if role == "output"}
            yield StoredSample(sid, m, v, rid, t, lat, ins, outs, from_npy(label[0]) if label else None)

    def drift_history(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT version, time, rows, detected, min_p_value, max_ks, max_psi, detail FROM drift "
                                   "WHERE model = ? ORDER BY id", (model,)).fetchall()
        keys = ("version", "time", "rows", "detected", "min_p_value", "max_ks", "max_psi", "detail")
        return [dict(zip(keys, r[:-1]), detail=json.loads(r[-1])) for r in rows]

    def live_history(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self.db.execute("SELECT version, time, metric, value, n FROM live WHERE model = ? ORDER BY id",
                                   (model,)).fetchall()
        return [dict(zip(("version", "time", "metric", "value", "n"), r)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self.db.close()
