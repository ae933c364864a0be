"""extproc/strategies/profiles.py: the built-in table; profiles from --config: adding, overriding,
validating; the legacy flags; per-route overrides."""

from __future__ import annotations

import random

import pytest
import yaml

from extproc.cli import main
from extproc.config import ConfigError, load_settings
from extproc.decide import decide
from extproc.prefix_index import PrefixIndex
from extproc.processor import Processor
from extproc.route_settings import RouteSettings, parse_route_settings
from extproc.strategies import (
    BUILTIN,
    FALLBACKS,
    STRATEGIES,
    ProfileError,
    RequestFacts,
    load_profiles,
)

from ..helpers import registry, scrape_ok, vm
from .helpers import prefix_facts, run


def test_builtins_build_from_the_one_table():
    table = load_profiles()
    assert list(table) == list(BUILTIN) == list(STRATEGIES)
    assert table["prefix-cache"].uses[0].params == {"guard_abs": 8, "guard_rel": 1.5}
    assert table["least-request"].needs_metrics and not table["weighted"].needs_metrics
    assert all(p.description for p in table.values())


def test_a_new_profile_gets_defaults_and_an_override_replaces_only_the_fields_given():
    table = load_profiles(
        {
            "fast": {
                "scorers": {"latency": 2, "prefix": {"weight": 3, "guard_abs": 16}},
                "picker": {"name": "near-best", "tolerance": 0.2},
            },
            "weighted": {"scorers": {"queue": 1, "prefix": 5}},
            "lazy": None,
        }
    )
    fast = table["fast"]
    assert fast.weights == {"latency": 2, "prefix": 3}
    assert fast.uses[1].params == {"guard_abs": 16, "guard_rel": 1.0}  # the scorer's default kept
    assert (fast.picker.name, fast.picker_params) == ("near-best", {"tolerance": 0.2})
    assert table["weighted"].weights == {"queue": 1, "prefix": 5}
    assert table["weighted"].picker.name == "max"  # not given: the built-in's
    assert table["lazy"].weights == {} and table["lazy"].picker.name == "max"
    assert STRATEGIES["weighted"].weights == {
        "queue": 1,
        "kv": 1,
        "prefix": 4,
        "lora": 1,
    }  # untouched


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ({"x": {"scorers": {"speed": 1}}}, "profile x: unknown scorer 'speed'; known: kv, latency"),
        ({"x": {"scorers": {"queue": -1}}}, "profile x: scorers.queue"),
        (
            {"x": {"scorers": {"queue": {"weight": 1, "guard_abs": 2}}}},
            "scorer queue has no parameter 'guard_abs'",
        ),
        (
            {"x": {"scorers": {"prefix": {"guard_abs": "high"}}}},
            "guard_abs must be a non-negative number",
        ),
        ({"x": {"picker": "best"}}, "unknown picker 'best'; known: max, near-best"),
        (
            {"x": {"picker": {"name": "near-best", "width": 1}}},
            "picker near-best has no parameter 'width'",
        ),
        (
            {"x": {"picker": {"name": "max", "tolerance": 1}}},
            "picker max has no parameter 'tolerance'",
        ),
        ({"x": {"scorers": {"queue": 1}, "picker": "random"}}, "picker random ignores scores"),
        ({"x": {"scorers": {"queue": 1}, "reason": "queue"}}, "reason 'queue' must be one of"),
        ({"x": {"scorers": {"queue": 1}, "colour": "red"}}, "profile x: colour: Extra inputs"),
        ({"Fast": {}}, "profile name 'Fast'"),
        ({"x": "queue"}, "profile x"),
        ("profiles", "must be a mapping"),
    ],
)
def test_bad_profiles_are_clear_errors(specs, message):
    with pytest.raises(ProfileError, match=message.replace("(", r"\(")):
        load_profiles(specs)


def test_legacy_flags_apply_on_top():
    table = load_profiles(
        {"weighted": {"scorers": {"queue": 1, "kv": 1}}},
        weights={"prefix": 4},
        prefix_guard={"guard_abs": 2.0},
    )
    assert table["weighted"].weights == {"queue": 1, "kv": 1, "prefix": 4}
    assert table["prefix-cache"].uses[0].params["guard_abs"] == 2.0
    with pytest.raises(
        ProfileError, match="reason 'prefix' must be one of"
    ):  # the built-in's reason stays
        load_profiles({"prefix-cache": {"scorers": {"queue": 1}}})
    with pytest.raises(ProfileError, match="no scorer prefix"):
        load_profiles(
            {"prefix-cache": {"scorers": {"queue": 1}, "reason": None}},
            prefix_guard={"guard_abs": 2.0},
        )


def test_the_profile_table_declares_every_strategy_of_the_api():
    assert list(STRATEGIES) == [
        "random",
        "round-robin",
        "least-request",
        "throughput",
        "least-kv-cache",
        "least-latency",
        "prefix-cache",
        "session",
        "weighted",
    ]
    assert STRATEGIES["weighted"].weights == {"queue": 1, "kv": 1, "prefix": 4, "lora": 1}
    assert STRATEGIES["weighted"].uses[2].params == {"guard_abs": 8, "guard_rel": 1.5}
    for name in (
        "throughput",
        "least-kv-cache",
        "least-latency",
    ):  # lagging signals: with the queue
        assert "queue" in STRATEGIES[name].weights


def test_weighted_blends_and_weights_change_the_choice():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=6, kv=0.9))
    scrape_ok(reg, 1, vm(running=0, kv=0.1))
    index = PrefixIndex()
    prompt = "shared " * 100
    index.record("10.0.0.1:8000", index.hashes("m", prompt))
    facts = prefix_facts(index, prompt)
    assert run(reg, "weighted", facts).backend.index == 0  # prefix (4) beats load + kv (2)
    load_heavy = STRATEGIES["weighted"].with_weights({"queue": 3, "kv": 3, "lora": 0})
    assert run(reg, "weighted", facts, profile=load_heavy).backend.index == 1
    # The load guard: the holder 10 requests (> 8 and > 1.5x) above the idle server loses its
    # prefix score, whatever the weights.
    scrape_ok(reg, 0, vm(running=10, kv=0.9))
    assert run(reg, "weighted", facts).backend.index == 1


# -- through the settings --------------------------------------------------------------------
def test_profiles_come_from_the_config_file(tmp_path):
    cfg = tmp_path / "extproc.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "strategy": "cached-fast",
                "profiles": {"cached-fast": {"scorers": {"prefix": 3, "latency": 1, "queue": 1}}},
            }
        )
    )
    s = load_settings({}, str(cfg))
    table = s.profile_table()
    assert s.strategy == "cached-fast" and table["cached-fast"].weights == {
        "prefix": 3,
        "latency": 1,
        "queue": 1,
    }
    # The legacy flags only count when given: here the file's weighted stays as the built-in.
    assert table["weighted"].weights == STRATEGIES["weighted"].weights


def test_profiles_on_the_command_line_and_errors_name_the_place(capsys):
    s = load_settings({"profiles": '{"one": {"scorers": {"queue": 1}}}', "strategy": "one"})
    assert s.profile_table()["one"].weights == {"queue": 1}
    with pytest.raises(ConfigError, match="profile one: unknown scorer"):
        load_settings({"profiles": "one: {scorers: {speed: 1}}"})
    with pytest.raises(ConfigError, match="not JSON/YAML"):
        load_settings({"profiles": "{unclosed"})
    with pytest.raises(ConfigError, match="unknown strategy 'two'; valid: random"):
        load_settings({"profiles": '{"one": {}}', "strategy": "two"})
    assert main(["serve", "--profiles", "x: {picker: best}"]) == 2
    assert "unknown picker 'best'" in capsys.readouterr().err


def test_weights_and_guard_flags_reach_their_profiles():
    s = load_settings({"weights": "prefix=5", "prefix_guard_abs": 16.0})
    table = s.profile_table()
    assert table["weighted"].weights == {"queue": 1, "kv": 1, "prefix": 5, "lora": 1}
    assert table["prefix-cache"].uses[0].params == {"guard_abs": 16.0, "guard_rel": 1.5}


def test_a_config_profile_is_selectable_per_request_and_per_route():
    from ..test_processor import decode, headers_msg

    reg, _ = registry(3)
    for i in range(3):
        scrape_ok(reg, i, vm(running=i))
    table = load_profiles(
        {"mine": {"scorers": {"queue": 1}, "picker": {"name": "near-random", "tolerance": 1}}}
    )
    proc = Processor(
        reg,
        default_strategy="mine",
        fallback=FALLBACKS["random"],
        metrics=_metrics(),
        default_route=RouteSettings(profiles=table),
        rng=random.Random(0),
    )
    md = decode(proc.handle(headers_msg())).dynamic_metadata["extproc"]
    assert md["strategy"] == "mine" and md["reason"] == "metrics"
    md = decode(proc.handle(headers_msg(x_routing_strategy="Round-Robin"))).dynamic_metadata[
        "extproc"
    ]
    assert md["strategy"] == "round-robin"
    route = parse_route_settings([("x-extproc-strategy", "mine")], RouteSettings(profiles=table))
    assert route.strategy == "mine" and route.profiles is table
    with pytest.raises(KeyError, match="unknown strategy 'nope'; valid: random"):
        Processor(reg, default_strategy="nope", fallback=FALLBACKS["random"], metrics=_metrics())


def test_route_weights_build_a_derived_weighted_profile():
    reg, _ = registry(2)
    scrape_ok(reg, 0, vm(running=0, kv=0.9))
    scrape_ok(reg, 1, vm(running=5, kv=0.0))
    route = parse_route_settings([("x-extproc-weights", "queue=10,kv=0")])
    assert route.profiles["weighted"].weights == {"queue": 10, "prefix": 4, "lora": 1}
    d = decide(
        route.profiles["weighted"],
        FALLBACKS["random"],
        RequestFacts(),
        reg.snapshot(),
        random.Random(0),
    )
    assert d.backend.index == 0


def _metrics():
    from extproc.observability import Metrics

    return Metrics()
