"""``RequestFacts.prefix_match``: exact where a server publishes KV events, approximate elsewhere.

Per request, :meth:`PrefixSource.lookup` computes the approximate index's hashes (always: the
processor records the pick there) and, when KV events and a tokenizer for the model are
configured, the prompt's token ids (once per request, cached by prompt). Per server, the match
is then

* **exact** when the server has sent KV events: the fraction of the prompt's full blocks (of the
  server's block size, LoRA adapter in the chain's root) that lead its cached blocks - or, if
  larger, the approximate match of the picks sent to it in the last ``RECENT_SECONDS`` (and
  after the last eviction it reported): a
  server publishes a block only once it has computed it, so without this the second request of
  a new prefix, arriving while the first is still queued or in prefill, would see no holder and
  start a second copy elsewhere (the routers that track their own picks do not);
* **approximate** otherwise (no events from it, no tokenizer for the model, tokenizing failed):
  the gateway's own record of what it routed (extproc/prefix_index.py).

Which one decided is counted for the server picked (``extproc_prefix_source_total``).

:meth:`PromptPrefix.holders` names the servers that hold the prompt's first block (both indexes
keep who holds each chain's first block): a decision at 1,000 backends asks only those, when
they are few.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from extproc.kv_index import KvIndex, ServerBlocks, chain_hashes, root_hash
from extproc.kv_metrics import KvMetrics
from extproc.openai_request import ParsedRequest
from extproc.prefix_index import PrefixIndex
from extproc.tokenizer import PromptTokens, Tokenizers

log = logging.getLogger(__name__)

# Longer than a request's queueing + prefill under load (then its events are in), short enough
# that an eviction the events report is believed soon after.
RECENT_SECONDS = 5.0


def _no_adapters(model: str) -> frozenset[str]:
    return frozenset()


class PrefixSource:
    def __init__(
        self,
        approx: PrefixIndex,
        *,
        kv: KvIndex | None = None,
        tokenizers: Tokenizers | None = None,
        metrics: KvMetrics | None = None,
        adapter_endpoints: Callable[[str], frozenset[str]] = _no_adapters,
    ) -> None:
        self.approx = approx
        self.kv = kv
        self.tokenizers = tokenizers
        self.metrics = metrics
        # Endpoints serving ``model`` as a LoRA adapter (their chains start at the adapter's root).
        self.adapter_endpoints = adapter_endpoints
        self._events_seen = False

    @property
    def exact_possible(self) -> bool:
        return self.kv is not None and self.tokenizers is not None

    def lookup(self, parsed: ParsedRequest) -> PromptPrefix:
        hashes = self.approx.hashes(parsed.model, parsed.prompt)
        tokens: PromptTokens | None = None
        if self.tokenizers is not None and self.kv is not None and self._any_events():
            tokens, result = self.tokenizers.tokenize(
                parsed.model,
                messages=parsed.messages,
                prompt=parsed.prompt,
                prompt_ids=parsed.prompt_ids,
                options=parsed.template_options,
                key_text=parsed.prompt,
            )
            if self.metrics is not None:
                self.metrics.tokenized(result)
        return PromptPrefix(self, parsed.model, hashes, tokens)

    def _any_events(self) -> bool:
        """Some server has sent events (until then tokenizing would buy nothing). Once true it
        stays true: an O(pool) scan per request only while nothing has arrived yet."""
        if not self._events_seen:
            assert self.kv is not None
            self._events_seen = any(s.has_events for s in self.kv.servers.values())
        return self._events_seen


class PromptPrefix:
    """One request's prompt as the prefix indexes see it."""

    __slots__ = (
        "_adapters",
        "_holders",
        "_recent_since",
        "approx_hashes",
        "has_prompt",
        "match",
        "model",
        "source",
        "tokens",
    )

    def __init__(
        self,
        source: PrefixSource,
        model: str,
        approx_hashes: tuple[int, ...],
        tokens: PromptTokens | None,
    ) -> None:
        self.source = source
        self.model = model
        self.approx_hashes = approx_hashes
        self.tokens = tokens
        self._adapters: frozenset[str] | None = None
        self._holders: Collection[str] | None = None
        self.has_prompt = bool(approx_hashes) or bool(tokens is not None and len(tokens.tokens))
        approx = source.approx
        if tokens is None:  # today's path, as cheap as before
            self.match: Callable[[str], float] = lambda endpoint: approx.match_fraction(
                endpoint, approx_hashes
            )
        else:
            self._recent_since = time.monotonic() - RECENT_SECONDS
            self.match = self._match

    def _match(self, endpoint: str) -> float:
        kv = self.source.kv
        server = kv.get(endpoint) if kv is not None else None
        if server is None:
            return self.source.approx.match_fraction(endpoint, self.approx_hashes)
        hashes = self.exact_hashes(endpoint, server)
        exact = server.matched_blocks(hashes) / len(hashes) if hashes else 0.0
        if exact >= 1.0:
            return exact
        recent = self.source.approx.match_fraction(
            endpoint, self.approx_hashes, max(self._recent_since, server.evicted_at)
        )
        return max(exact, recent)

    def holders(self) -> Collection[str]:
        """A superset of the servers whose :meth:`match` is above 0 (computed once): those
        holding the prompt's first block, in the approximate index or (for every block size
        and chain root in use) the exact one. Do not modify."""
        found = self._holders
        if found is None:
            found = self._holders = self._find_holders()
        return found

    def _find_holders(self) -> Collection[str]:
        source = self.source
        approx = source.approx.holders(self.approx_hashes)
        kv = source.kv
        if self.tokens is None or kv is None or not kv.sizes:
            return approx
        who = set(approx)
        roots = [root_hash(None)]
        if self._adapter_endpoints():
            roots.append(root_hash(self.model))
        for size in kv.sizes:
            for root in roots:
                hashes = self._chain(size, root)
                if hashes:
                    who |= kv.holders(hashes[0])
        return who

    def _adapter_endpoints(self) -> frozenset[str]:
        if self._adapters is None:  # once per request, and only on the exact path
            self._adapters = self.source.adapter_endpoints(self.model)
        return self._adapters

    def exact_hashes(self, endpoint: str, server: ServerBlocks) -> tuple[int, ...]:
        lora = self.model if endpoint in self._adapter_endpoints() else None
        return self._chain(server.block_size, root_hash(lora))

    def _chain(self, block_size: int, root: int) -> tuple[int, ...]:
        assert self.tokens is not None
        key = (block_size, root)
        cached = self.tokens.hashes.get(key)
        if cached is None:
            cached = self.tokens.hashes[key] = chain_hashes(self.tokens.tokens, block_size, root)
        return cached

    def source_for(self, endpoint: str) -> str:
        kv = self.source.kv
        if self.tokens is not None and kv is not None and kv.get(endpoint) is not None:
            return "exact"
        return "approximate"

    def picked(self, endpoint: str) -> None:
        """Count which source valued the server the decision picked."""
        metrics = self.source.metrics
        if metrics is not None and self.has_prompt:
            source = self.source_for(endpoint)
            metrics.source(source)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "prefix: picked %s, %s match %.3f (%d prompt tokens)",
                    endpoint,
                    source,
                    self.match(endpoint),
                    len(self.tokens.tokens) if self.tokens is not None else -1,
                )
