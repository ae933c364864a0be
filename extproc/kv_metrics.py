"""Prometheus series of the exact prefix-cache state (KV events, tokenizer, which source routed).

Per-backend gauges are read from the index when Prometheus scrapes; hot counters cache their
label children. A backend that leaves the pool takes its series with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.kv_index import Applied, KvIndex


class _IndexCollector(Collector):
    def __init__(self, index: KvIndex) -> None:
        self._index = index

    def collect(self) -> Iterator[GaugeMetricFamily]:
        blocks = GaugeMetricFamily(
            "extproc_kv_index_blocks",
            "Blocks the exact prefix index holds for the backend (from its KV events).",
            labels=["backend"],
        )
        size = GaugeMetricFamily(
            "extproc_kv_index_block_size",
            "Tokens per block of the backend, from its KV events (0: none yet).",
            labels=["backend"],
        )
        for endpoint, server in list(self._index.servers.items()):
            blocks.add_metric([endpoint], float(len(server)))
            size.add_metric([endpoint], float(server.block_size))
        yield blocks
        yield size


class KvMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._events = Counter(
            "extproc_kv_events_total",
            "KV-cache events received per backend and type (BlockStored, BlockRemoved, AllBlocksCleared, "
            "undecodable).",
            ["backend", "type"],
            registry=registry,
        )
        self._batches = Counter(
            "extproc_kv_event_batches_total",
            "KV-event messages per backend by outcome: ok; gap (sequence numbers skipped: the backend's "
            "index was dropped and is rebuilt from new events); restart (the sequence went back: a new "
            "server process); undecodable.",
            ["backend", "outcome"],
            registry=registry,
        )
        self._skipped = Counter(
            "extproc_kv_blocks_skipped_total",
            "Events or blocks of BlockStored/BlockRemoved not indexed, by reason: orphan (parent block "
            "unknown), ignored (another tier or KV cache group), malformed.",
            ["backend", "reason"],
            registry=registry,
        )
        self._source = Counter(
            "extproc_prefix_source_total",
            "Routed requests with a prompt, by the prefix-cache source used for the server picked: exact "
            "(its KV events and the model's tokenizer) or approximate (the gateway's own record).",
            ["source"],
            registry=registry,
        )
        self._tokenize = Counter(
            "extproc_prompt_tokenize_total",
            "Prompts tokenized for the exact prefix index, by result (ok, cached, no-tokenizer, error).",
            ["result"],
            registry=registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._labels_by_backend: dict[str, set[tuple[Counter, str]]] = {}

    def attach_index(self, index: KvIndex) -> None:
        self.registry.register(_IndexCollector(index))

    def _inc(self, counter: Counter, backend: str, label: str, n: float = 1.0) -> None:
        key = (counter, backend, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(backend, label)
            self._labels_by_backend.setdefault(backend, set()).add((counter, label))
        child.inc(n)

    def applied(self, backend: str, a: Applied) -> None:
        self._inc(self._batches, backend, a.outcome.value)
        if a.stored:
            self._inc(self._events, backend, "BlockStored", a.stored)
        if a.removed:
            self._inc(self._events, backend, "BlockRemoved", a.removed)
        if a.cleared:
            self._inc(self._events, backend, "AllBlocksCleared", a.cleared)
        for reason in ("orphan", "ignored", "malformed"):
            n = getattr(a, reason)
            if n:
                self._inc(self._skipped, backend, reason, n)

    def undecodable(self, backend: str, events: int = 0, batch: bool = False) -> None:
        if events:
            self._inc(self._events, backend, "undecodable", events)
        if batch:
            self._inc(self._batches, backend, "undecodable")

    def source(self, source: str) -> None:
        key = (self._source, source)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._source.labels(source)
        child.inc()

    def tokenized(self, result: str) -> None:
        key = (self._tokenize, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._tokenize.labels(result)
        child.inc()

    def forget_backend(self, backend: str) -> None:
        for counter, label in self._labels_by_backend.pop(backend, ()):
            try:
                counter.remove(backend, label)
            except KeyError:
                pass
            self._children.pop((counter, backend, label), None)
