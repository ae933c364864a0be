"""bench/routing_specs.py: contender selection by name and pattern, and their order."""

from __future__ import annotations

import pytest

from bench.routing_specs import Contender, contender_order, select_contenders

KNOWN = [
    Contender("extproc", "weighted"),
    Contender("extproc", "random"),
    Contender("envoy", "round-robin"),
    Contender("sglang-router", "cache_aware"),
    Contender("sglang-router", "round_robin"),
    Contender("vllm-router", "cache_aware"),
]


def test_select_contenders_by_name_family_pattern_and_all():
    names = lambda spec: [c.name for c in select_contenders(spec, KNOWN)]  # noqa: E731
    assert names("extproc:weighted,envoy") == ["extproc:weighted", "envoy:round-robin"]
    assert names("*:cache_aware") == ["sglang-router:cache_aware", "vllm-router:cache_aware"]
    assert names("sglang-router, extproc:weighted, sglang-router:round_robin") == [
        "sglang-router:cache_aware",
        "sglang-router:round_robin",
        "extproc:weighted",
    ]
    assert len(names("all")) == len(KNOWN)
    with pytest.raises(ValueError, match="no contender matches 'extproc:nope'"):
        select_contenders("extproc:nope", KNOWN)


def test_contender_order_puts_rust_policies_in_their_order():
    names = [
        "sglang-router:cache_aware",
        "envoy:round-robin",
        "sglang-router:round_robin",
        "extproc:weighted",
        "vllm-router:power_of_two",
    ]
    assert sorted(names, key=contender_order) == [
        "extproc:weighted",
        "envoy:round-robin",
        "vllm-router:power_of_two",
        "sglang-router:round_robin",
        "sglang-router:cache_aware",
    ]
