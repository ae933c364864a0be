"""What crosses processes with ``--workers N`` (docs/scaling.md).

The main process scrapes and owns the backend registry; N worker processes answer ext_proc.
Two things are shared, both through files in the main's private run directory (on ``/dev/shm``
where it exists, so the pages are plain shared memory):

* **the backend state**, published by the main after every snapshot rebuild (once per scrape
  interval, and at once on a transition: newcomer, suspect, unhealthy, models): a msgpack blob
  written to a temporary file and renamed over ``state`` (readers never see half of one), then a
  sequence number bumped in the counters file. A worker compares that number on every decision
  (one 8-byte read) and reloads when it moved, so a published change is used by the very next
  decision; with the main stalled a worker ages its own copy (freshness degrades to stale and
  unknown as in one process).
* **the in-flight counters**: an int64 array ``[workers x columns]`` of cumulative ``sent`` and
  ``done`` per backend column, each worker writing only its own row (no locks: one writer per
  cell, aligned 8-byte stores). In flight = sum(sent) - sum(done) - ``base``; pending (picked
  since the scrape before the last good one began, as in one process) = min(in flight,
  sum(sent) - ``mark``), ``mark`` being the sent total the main read when that scrape began.
  A pick in any worker is therefore seen by the next decision of every worker. ``base`` and
  ``mark`` live in the counters file too (written by the main, one 8-byte store), so a good
  scrape changes what every worker counts as pending at once, as in one process.

A backend keeps its column while it is in the pool. A freed column is given again only after
``COLUMN_QUARANTINE_S`` (no worker still routes to the old backend from an old copy) and with a
new ``epoch``: a worker drops the release of a pick made for an earlier occupant, whose open
count stays in the new occupant's ``base``.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import msgspec
import numpy as np

from extproc.backends import BackendRecord, BackendRegistry, PickToken, SharedSlot
from extproc.metrics_parser import VllmMetrics
from extproc.snapshot import Snapshot

log = logging.getLogger(__name__)

MAGIC = 0x31636F7270747865  # b"extproc1" little-endian
# Columns of the counters: backends in the pool at once, plus recently left ones in quarantine.
DEFAULT_COLUMNS = 16384
# A freed column is not given to another backend before this many seconds: by then every worker
# has loaded a state without the old backend (the main publishes every scrape interval).
COLUMN_QUARANTINE_S = 10.0

# Header words (int64) of the counters file.
_H_MAGIC, _H_WORKERS, _H_COLUMNS, _H_SEQ, _H_SERVING, _H_HIGH = range(6)
_H_WORKER0 = 8  # then per worker: pid once it serves (0 otherwise), open ext_proc streams
_WORKER_WORDS = 2

_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(VllmMetrics))
if TYPE_CHECKING:
    _MetricsRow = tuple[Any, ...]
else:  # a typed tuple, so msgpack arrays decode back to VllmMetrics' own field types
    _hints = get_type_hints(VllmMetrics)
    _MetricsRow = tuple.__class_getitem__(tuple(_hints[f] for f in _METRIC_FIELDS))


class BackendRow(msgspec.Struct, array_like=True):
    """One backend as the main publishes it: what build_snapshot reads, plus its column."""

    url: str
    endpoint: str
    column: int
    epoch: int
    metrics: _MetricsRow | None
    last_ok: float | None
    failures: int
    timeouts: int
    last_error: str
    token_rate: float | None
    ttft: float | None
    failing: bool
    served_models: frozenset[str]
    adapters: frozenset[str]


class PublishedState(msgspec.Struct, array_like=True):
    seq: int
    backends: list[BackendRow]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(PublishedState)


def encode_state(seq: int, records: Iterable[BackendRecord]) -> bytes:
    rows = []
    for r in records:
        sh = r.shared
        assert sh is not None, "every published backend has a column"
        m = r.metrics
        rows.append(
            BackendRow(
                r.url,
                r.endpoint,
                sh.index,
                sh.epoch,
                None if m is None else tuple(getattr(m, f) for f in _METRIC_FIELDS),
                r.last_ok,
                r.failures,
                r.timeouts,
                r.last_error,
                r.token_rate,
                r.ttft,
                r.failing,
                r.served_models,
                r.adapters,
            )
        )
    return _ENCODER.encode(PublishedState(seq, rows))


def decode_state(blob: bytes) -> PublishedState:
    return _DECODER.decode(blob)


# -- the counters file --------------------------------------------------------------------------
class SharedCounters:
    """The mmap'ed counters file: header, column epochs, then ``sent`` and ``done`` rows."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        words = memoryview(mm).cast("q")
        if words[_H_MAGIC] != MAGIC:
            words.release()
            raise ValueError("not an extproc counters file")
        self._words = words
        self.workers = w = words[_H_WORKERS]
        self.columns = c = words[_H_COLUMNS]
        self._epoch0 = e = _header_words(w)
        self._sent0 = e + 3 * c
        self._done0 = self._sent0 + w * c
        everything = np.frombuffer(mm, dtype=np.int64)
        self.epochs = everything[e : e + c]
        self.bases = everything[e + c : e + 2 * c]
        self.marks = everything[e + 2 * c : e + 3 * c]
        self.sent = everything[self._sent0 : self._done0].reshape(w, c)
        self.done = everything[self._done0 : self._done0 + w * c].reshape(w, c)

    @classmethod
    def create(cls, path: Path, workers: int, columns: int = DEFAULT_COLUMNS) -> SharedCounters:
        size = (_header_words(workers) + columns * (3 + 2 * workers)) * 8
        with open(path, "w+b") as f:
            f.truncate(size)  # sparse: pages are allocated as columns come into use
            mm = mmap.mmap(f.fileno(), size)
        words = memoryview(mm).cast("q")
        words[_H_WORKERS], words[_H_COLUMNS] = workers, columns
        words[_H_MAGIC] = MAGIC  # last: an attacher never sees a half-written header
        words.release()
        return cls(mm)

    @classmethod
    def attach(cls, path: Path) -> SharedCounters:
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        return cls(mm)

    def close(self) -> None:
        del self.epochs, self.bases, self.marks, self.sent, self.done
        self._words.release()
        self._mm.close()

    # -- header -----------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return self._words[_H_SEQ]

    def bump_seq(self) -> None:
        self._words[_H_SEQ] += 1

    @property
    def serving(self) -> bool:
        return self._words[_H_SERVING] == 1

    @serving.setter
    def serving(self, value: bool) -> None:
        self._words[_H_SERVING] = 1 if value else 0

    @property
    def high(self) -> int:
        """Columns ever given are below this."""
        return self._words[_H_HIGH]

    @high.setter
    def high(self, value: int) -> None:
        self._words[_H_HIGH] = value

    def set_worker(self, row: int, *, pid: int | None = None, streams: int | None = None) -> None:
        at = _H_WORKER0 + row * _WORKER_WORDS
        if pid is not None:
            self._words[at] = pid
        if streams is not None:
            self._words[at + 1] = streams

    def worker_pid(self, row: int) -> int:
        """The worker's pid once it serves, 0 before and after."""
        return self._words[_H_WORKER0 + row * _WORKER_WORDS]

    def worker_streams(self, row: int) -> int:
        return self._words[_H_WORKER0 + row * _WORKER_WORDS + 1]

    # -- a worker's own row -----------------------------------------------------------------
    def pick(self, row: int, column: int) -> None:
        self._words[self._sent0 + row * self.columns + column] += 1

    def release(self, row: int, column: int, epoch: int) -> bool:
        """Count a pick as done, unless the column went to another backend since (False)."""
        if self._words[self._epoch0 + column] != epoch:
            return False
        self._words[self._done0 + row * self.columns + column] += 1
        return True

    def epoch(self, column: int) -> int:
        return self._words[self._epoch0 + column]

    # -- the main ---------------------------------------------------------------------------
    def sent_total(self, column: int) -> int:
        return int(self.sent[:, column].sum())

    def give(self, column: int) -> SharedSlot:
        """Hand ``column`` to a new backend: new epoch, earlier occupants' open picks as base."""
        self.epochs[column] += 1
        sent = int(self.sent[:, column].sum())
        self.bases[column] = sent - int(self.done[:, column].sum())
        self.marks[column] = sent
        if column >= self.high:
            self.high = column + 1
        return SharedSlot(column, int(self.epochs[column]))

    def set_mark(self, column: int, sent: int) -> None:
        """Picks after the ``sent``-th are pending (not in the scraped numbers yet)."""
        if sent > self.marks[column]:
            self.marks[column] = sent

    def reset_row(self, row: int) -> None:
        """A dead worker's open picks will never be released: count them done."""
        self.done[row, :] = self.sent[row, :]
        self.set_worker(row, pid=0, streams=0)

    def live(self, columns: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        """(in flight, pending) per column of ``columns`` (never negative). A slice (the usual
        case: columns are given in pool order) reads views, an index array copies."""
        sent = np.add.reduce(self.sent[:, columns], axis=0)
        inflight = sent - np.add.reduce(self.done[:, columns], axis=0)
        inflight -= self.bases[columns]
        np.maximum(inflight, 0, out=inflight)
        sent -= self.marks[columns]  # now: picked since the mark
        np.minimum(sent, inflight, out=sent)
        np.maximum(sent, 0, out=sent)
        return inflight, sent


def _header_words(workers: int) -> int:
    n = _H_WORKER0 + workers * _WORKER_WORDS
    return (n + 7) // 8 * 8  # the epochs start on a 64-byte boundary


class ColumnTable:
    """The main's allocation of counter columns to backends (see the module docstring)."""

    def __init__(
        self,
        counters: SharedCounters,
        *,
        quarantine: float = COLUMN_QUARANTINE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self.quarantine = quarantine
        self._clock = clock
        self._freed: dict[int, float] = {}  # column -> when it was freed
        self._next = counters.high  # never given yet from here on

    def give(self) -> SharedSlot:
        now = self._clock()
        ready = [c for c, t in self._freed.items() if now - t >= self.quarantine]
        if ready:
            column = min(ready)  # keep the used range compact
        elif self._next < self.counters.columns:
            column = self._next
            self._next += 1
        elif self._freed:  # every column taken: the longest-freed one, quarantine or not
            column = min(self._freed, key=self._freed.__getitem__)
            log.warning("in-flight counters: all %d columns in use", self.counters.columns)
        else:
            raise RuntimeError(f"more than {self.counters.columns} backends in the pool")
        self._freed.pop(column, None)
        return self.counters.give(column)

    def free(self, column: int) -> None:
        self._freed[column] = self._clock()


# -- the published state file ------------------------------------------------------------------
class StateFile:
    """``state`` in the run directory: replaced atomically, announced by the counters' seq."""

    def __init__(self, path: Path, counters: SharedCounters) -> None:
        self.path = path
        self.counters = counters
        self._tmp = path.with_name(path.name + ".tmp")

    def publish(self, blob: bytes) -> None:
        with open(self._tmp, "wb") as f:
            f.write(blob)
        os.replace(self._tmp, self.path)
        self.counters.bump_seq()

    def read(self) -> bytes:
        return self.path.read_bytes()


# -- the main's registry -------------------------------------------------------------------------
class MainRegistry(BackendRegistry):
    """The main process's registry: scrapes land here as in one process; every rebuild is
    published to the workers, and observers (admin, metrics) see the workers' summed in-flight
    counts in ``record.inflight`` / ``record.pending``."""

    def __init__(
        self,
        counters: SharedCounters,
        state: StateFile,
        *,
        stale_after: float,
        max_metrics_age: float,
        clock: Callable[[], float] = time.monotonic,
        quarantine: float = COLUMN_QUARANTINE_S,
    ) -> None:
        super().__init__(stale_after=stale_after, max_metrics_age=max_metrics_age, clock=clock)
        self.counters = counters
        self.state = state
        self.columns = ColumnTable(counters, quarantine=quarantine, clock=clock)
        self.published = 0  # sequence number of the last state published

    def set_backends(self, urls: Iterable[str]) -> tuple[list[BackendRecord], list[BackendRecord]]:
        added, removed = super().set_backends(urls)  # rebuilds, so publishes without `removed`
        for r in removed:
            if r.shared is not None:
                self.columns.free(r.shared.index)
        return added, removed

    def begin_scrape(self, record: BackendRecord) -> int:
        generation = super().begin_scrape(record)
        sh = record.shared
        if sh is not None:
            sh.started[generation] = self.counters.sent_total(sh.index)
            for g in [g for g in sh.started if g < generation - 2]:
                del sh.started[g]
        return generation

    def record_success(
        self, record: BackendRecord, metrics: VllmMetrics, started_generation: int
    ) -> None:
        sh = record.shared
        if sh is not None:
            # As in one process: what was picked before the PREVIOUS scrape began is in these
            # numbers now. Without that scrape's mark (the first scrape), nothing is.
            mark = sh.started.get(started_generation - 1)
            if mark is not None:
                self.counters.set_mark(sh.index, mark)
        super().record_success(record, metrics, started_generation)

    def rebuild(self) -> Snapshot:
        self._refresh_counts()  # the scraper's priorities read record.pending after the tick
        snap = super().rebuild()
        self.publish()
        return snap

    def publish(self) -> None:
        for r in self._ordered:
            if r.shared is None:
                r.shared = self.columns.give()
        self.published += 1
        self.state.publish(encode_state(self.published, self._ordered))

    def _refresh_counts(self) -> tuple[int, ...]:
        pairs = [(r, r.shared) for r in self._ordered if r.shared is not None]
        if pairs:
            inflight, pending = self.counters.live(np.array([s.index for _, s in pairs], np.intp))
            for (r, _), i, p in zip(pairs, inflight.tolist(), pending.tolist()):
                r.inflight, r.pending = i, p
        return tuple(r.pending for r in self._ordered)

    def snapshot(self) -> Snapshot:
        pending = self._refresh_counts()
        base = self._base
        if len(pending) != len(base.backends):
            return base
        return base.with_pending(pending, tuple(i for i, p in enumerate(pending) if p))

    def rebuild_view(self) -> Snapshot:
        self._refresh_counts()
        return super().rebuild_view()


# -- a worker's registry -------------------------------------------------------------------------
class MirrorRegistry(BackendRegistry):
    """A worker's read-only copy of the main's registry, with the shared in-flight counters.

    ``snapshot()`` reloads the published state when its sequence number moved, rebuilds with
    the worker's own clock when the main has published nothing for ``rebuild_after`` seconds,
    and adds the live pending counts of every worker.
    """

    def __init__(
        self,
        counters: SharedCounters,
        state: StateFile,
        row: int,
        *,
        stale_after: float,
        max_metrics_age: float,
        rebuild_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stale_after=stale_after, max_metrics_age=max_metrics_age, clock=clock)
        self.counters = counters
        self.state = state
        self.row = row
        self.rebuild_after = rebuild_after
        self.loaded = -1  # sequence number (of the blob) loaded
        self._seen = -1  # counters' seq when last read
        self._by_url: dict[str, BackendRecord] = {}
        self._columns: np.ndarray | slice = slice(0, 0)
        self._zeros: tuple[int, ...] = ()
        self.on_change: Callable[[], None] | None = None  # the pool's members changed

    def set_backends(self, urls: Iterable[str]) -> tuple[list[BackendRecord], list[BackendRecord]]:
        raise TypeError("a worker's registry follows the main's published state")

    def refresh(self) -> bool:
        """Load the published state if it changed; True if the pool's members changed."""
        seq = self.counters.seq
        if seq == self._seen:
            return False
        self._seen = seq
        try:
            state = decode_state(self.state.read())
        except (OSError, msgspec.DecodeError) as exc:  # not published yet / a bug: keep ours
            log.warning("cannot read the published backend state: %s", exc)
            return False
        if state.seq == self.loaded:
            return False
        self.loaded = state.seq
        return self.apply(state.backends)

    def apply(self, rows: Sequence[BackendRow]) -> bool:
        old = self._by_url
        ordered: list[BackendRecord] = []
        by_url: dict[str, BackendRecord] = {}
        for i, row in enumerate(rows):
            rec = old.get(row.url)
            sh = rec.shared if rec is not None else None
            if rec is None or sh is None or (sh.index, sh.epoch) != (row.column, row.epoch):
                rec = BackendRecord(url=row.url, endpoint=row.endpoint)
                rec.shared = SharedSlot(row.column, row.epoch)
            if row.last_ok != rec.last_ok or (row.metrics is None) != (rec.metrics is None):
                rec.metrics = None if row.metrics is None else VllmMetrics(*row.metrics)
            rec.last_ok = row.last_ok
            rec.failures, rec.timeouts, rec.last_error = row.failures, row.timeouts, row.last_error
            rec.token_rate, rec.ttft, rec.failing = row.token_rate, row.ttft, row.failing
            rec.served_models, rec.adapters = row.served_models, row.adapters
            rec.slot = i
            ordered.append(rec)
            by_url[row.url] = rec
        changed = list(by_url) != [r.url for r in self._ordered]
        for url, rec in old.items():
            if by_url.get(url) is not rec:
                rec.slot = -1
        self._by_url, self._ordered = by_url, ordered
        self._by_endpoint = {r.endpoint: i for i, r in enumerate(ordered)}
        columns = np.array([r.shared.index for r in ordered if r.shared], np.intp)
        lo = int(columns[0]) if len(columns) else 0
        contiguous = bool(np.array_equal(columns, np.arange(lo, lo + len(columns))))
        self._columns = slice(lo, lo + len(columns)) if contiguous else columns
        self._zeros = (0,) * len(ordered)
        self.rebuild()
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    def snapshot(self) -> Snapshot:
        if self.counters.seq != self._seen:
            self.refresh()
        elif self._clock() - self._base.built_at > self.rebuild_after:
            self.rebuild()  # the main is late: age our copy (fresh -> stale -> unknown) ourselves
        base = self._base
        n = len(self._ordered)
        if not n or n != len(base.backends):
            return base
        _, pending = self.counters.live(self._columns)
        active = np.flatnonzero(pending)
        if not len(active):
            return base.with_pending(self._zeros, ())
        return base.with_pending(tuple(pending.tolist()), tuple(active.tolist()))

    def on_pick(self, index: int) -> PickToken | None:
        if not 0 <= index < len(self._ordered):
            return None
        rec = self._ordered[index]
        sh = rec.shared
        if sh is None or self.counters.epoch(sh.index) != sh.epoch:
            return None  # the column went to another backend since our copy: count nothing
        self.counters.pick(self.row, sh.index)
        return PickToken(rec, sh.epoch)

    def on_done(self, token: PickToken) -> None:
        sh = token.record.shared
        if sh is not None:
            self.counters.release(self.row, sh.index, token.generation)
