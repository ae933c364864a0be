"""Per-route tuning sent by Envoy as gRPC initial metadata of the ext_proc stream.

envoy.yaml sets them per route with ``ExtProcPerRoute.overrides.grpc_initial_metadata``:

| key | value | meaning |
|---|---|---|
| ``x-extproc-strategy`` | a strategy name | this route's strategy (beats the client header and the service default) |
| ``x-extproc-allow-client-strategy`` | ``true`` / ``false`` | whether clients may pick with ``x-routing-strategy`` here (default true) |
| ``x-extproc-weights`` | ``queue=1,kv=1,prefix=4,lora=1`` | scorer weights of the ``weighted`` profile (missing keys keep theirs; ``0`` drops a scorer, another scorer's name adds it) |
| ``x-extproc-prefix-guard`` | ``abs=8,rel=1.5`` | load guard of the ``prefix-cache`` profile's prefix scorer |
| ``x-extproc-shed-queue-depth`` | a number, ``0`` = off | answer 429 when every candidate's queue is above it |

Precedence: route setting > client header (unless the route forbids it) > service default.
A bad value is logged once and ignored (the route then behaves as if it were absent):
an operator's typo must not fail user requests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from extproc.strategies import SCORERS, STRATEGIES, Profile

log = logging.getLogger(__name__)

PREFIX = "x-extproc-"


@dataclass(frozen=True, slots=True)
class RouteSettings:
    strategy: str | None = None
    allow_client_strategy: bool = True
    # The profiles requests on this route are routed by: the service's table (built-ins and
    # --config), with this route's x-extproc-weights / x-extproc-prefix-guard applied.
    profiles: Mapping[str, Profile] = field(default_factory=lambda: STRATEGIES)
    shed_queue_depth: float | None = None  # None: never shed


DEFAULT = RouteSettings()


def _pairs(value: str) -> dict[str, float]:
    out = {}
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, num = part.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {part!r}")
        x = float(num)
        if x < 0 or x != x:
            raise ValueError(f"{key.strip()} must be a non-negative number")
        out[key.strip()] = x
    return out


def parse_weights(value: str) -> dict[str, float]:
    """``queue=1,kv=1,prefix=4,lora=1``: scorer name -> weight; ValueError if bad."""
    pairs = _pairs(value)
    unknown = set(pairs) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown weight(s) {sorted(unknown)}; known scorers: {sorted(SCORERS)}")
    if any(v == float("inf") for v in pairs.values()):
        raise ValueError("weights must be finite")
    return pairs


def parse_guard(value: str) -> dict[str, float]:
    """``abs=8,rel=1.5`` -> the prefix scorer's ``guard_abs`` / ``guard_rel``; ValueError if bad."""
    pairs = _pairs(value)
    unknown = set(pairs) - {"abs", "rel"}
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)}; known: abs, rel")
    return {f"guard_{k}": v for k, v in pairs.items()}


def parse_route_settings(
    metadata: Iterable[tuple[str, str | bytes]], base: RouteSettings = DEFAULT
) -> RouteSettings:
    """Route metadata on top of ``base`` (the service-wide defaults)."""
    # ``-bin`` keys arrive as bytes; a value that is not UTF-8 is a typo, decoded with U+FFFD
    # (and then rejected below like any bad value), never an exception on the request path.
    values = {
        k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
        for k, v in metadata
        if k.startswith(PREFIX)
    }
    if not values:
        return base
    kw: dict[str, object] = {}
    profiles = base.profiles
    strategy = values.get(PREFIX + "strategy")
    if strategy is not None:
        if strategy in profiles:
            kw["strategy"] = strategy
        else:
            log.warning("route metadata names unknown strategy %r; using the default", strategy)
    allow = values.get(PREFIX + "allow-client-strategy")
    if allow is not None:
        kw["allow_client_strategy"] = allow.strip().lower() not in ("false", "0", "no", "off")
    weights = values.get(PREFIX + "weights")
    if weights is not None:
        try:
            profiles = {
                **profiles,
                "weighted": profiles["weighted"].with_weights(parse_weights(weights)),
            }
        except ValueError as exc:
            log.warning("ignoring route weights %r: %s", weights, exc)
    guard = values.get(PREFIX + "prefix-guard")
    if guard is not None:
        try:
            profiles = {
                **profiles,
                "prefix-cache": profiles["prefix-cache"].with_params("prefix", parse_guard(guard)),
            }
        except ValueError as exc:
            log.warning("ignoring route prefix guard %r: %s", guard, exc)
    if profiles is not base.profiles:
        kw["profiles"] = profiles
    shed = values.get(PREFIX + "shed-queue-depth")
    if shed is not None:
        try:
            depth = float(shed)
            if depth < 0 or depth != depth:
                raise ValueError("must be a non-negative number")
            kw["shed_queue_depth"] = depth or None
        except ValueError as exc:
            log.warning("ignoring route shed queue depth %r: %s", shed, exc)
    return replace(base, **kw)  # type: ignore[arg-type]


class RouteSettingsCache:
    """Envoy sends the same few metadata sets again and again: parse each once."""

    def __init__(self, base: RouteSettings = DEFAULT, limit: int = 1024) -> None:
        self.base = base
        self._cache: dict[tuple[tuple[str, str | bytes], ...], RouteSettings] = {}
        self._limit = limit

    def get(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> RouteSettings:
        if not metadata:
            return self.base
        key = tuple((k, v) for k, v in metadata if k.startswith(PREFIX))
        if not key:
            return self.base
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            found = self._cache[key] = parse_route_settings(key, self.base)
        return found
