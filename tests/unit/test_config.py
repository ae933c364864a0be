"""Settings precedence (flag > env > file > default) and readable errors."""

from __future__ import annotations

import pytest

from extproc.cli import build_parser, main
from extproc.config import ConfigError, load_settings


def test_defaults():
    s = load_settings({})
    assert (s.grpc_address, s.admin_address, s.strategy, s.fallback) == (
        "127.0.0.1:9002",
        "127.0.0.1:9090",
        "weighted",
        "random",
    )
    assert (s.scrape_interval, s.stale_after, s.max_metrics_age) == (0.1, 1.0, 10.0)


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text(
        "strategy: throughput\nscrape-interval: 0.5\nstale_after: 2\nbackend: [http://127.0.0.1:1]\n"
    )
    monkeypatch.setenv("EXTPROC_STRATEGY", "least-kv-cache")
    monkeypatch.setenv("EXTPROC_STALE_AFTER", "3")
    s = load_settings({"stale_after": 4.0}, str(f))
    assert s.strategy == "least-kv-cache"  # env beats file
    assert s.scrape_interval == 0.5  # file beats default
    assert s.stale_after == 4.0  # flag beats env
    assert s.backend == ["http://127.0.0.1:1"]


def test_env_lists_are_comma_separated(monkeypatch):
    monkeypatch.setenv("EXTPROC_BACKEND", "http://127.0.0.1:1, http://127.0.0.1:2")
    assert load_settings({}).backend == ["http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_repeatable_flags():
    args = vars(
        build_parser().parse_args(["serve", "--backend", "http://a:1", "--backend", "http://b:2"])
    )
    assert args["backend"] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    "cli, message",
    [
        ({"strategy": "nope"}, "unknown strategy"),
        ({"fallback": "least-request"}, "fallback"),
        ({"scrape_interval": 0.0}, "scrape_interval"),
        ({"stale_after": 5.0, "max_metrics_age": 1.0}, "max_metrics_age"),
    ],
)
def test_bad_settings_are_readable(cli, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(cli)


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({}, str(tmp_path / "missing.yaml"))


def test_cli_exits_2_with_message_on_bad_settings(capsys):
    assert main(["serve", "--strategy", "nope"]) == 2
    assert "unknown strategy" in capsys.readouterr().err


def test_weights_and_guard_flags_are_validated():
    s = load_settings({"weights": "prefix=5", "prefix_guard_abs": 16.0})
    assert (s.weights, s.prefix_guard_abs, s.prefix_guard_rel) == ("prefix=5", 16.0, 1.5)
    with pytest.raises(ConfigError, match="weights"):
        load_settings({"weights": "speed=3"})


def test_kv_events_and_tokenizer_flags(monkeypatch):
    args = vars(
        build_parser().parse_args(
            [
                "serve",
                "--kv-events-port",
                "5557",
                "--kv-events-endpoint",
                "10.0.0.1:8000=ipc:///tmp/a",
                "--kv-events-endpoint",
                "10.0.0.2:8000=tcp://10.0.0.2:5558",
                "--tokenizer",
                "m=/models/m",
                "--tokenizer",
                "*=vllmsim",
            ]
        )
    )
    s = load_settings({k: v for k, v in args.items() if k not in ("command", "config")})
    assert (
        s.kv_events_port == 5557
        and s.tokenize_max_chars == 8192
        and s.kv_events_max_blocks == 100_000
    )
    assert s.kv_events_endpoint == [
        "10.0.0.1:8000=ipc:///tmp/a",
        "10.0.0.2:8000=tcp://10.0.0.2:5558",
    ]
    assert s.tokenizer == ["m=/models/m", "*=vllmsim"]
    monkeypatch.setenv("EXTPROC_TOKENIZER", "a=/x,b=/y")
    assert load_settings({}).tokenizer == ["a=/x", "b=/y"]
    for cli, message in (
        ({"kv_events_endpoint": ["10.0.0.1=ipc:///x"]}, "IP:PORT=ZMQ_ENDPOINT"),
        ({"kv_events_endpoint": ["10.0.0.1:80=http://x"]}, "tcp://, ipc://"),
        ({"tokenizer": ["no-equals-sign"]}, "MODEL=PATH_OR_NAME"),
        ({"kv_events_port": 70000}, "kv_events_port"),
        ({"tokenize_max_chars": 0}, "tokenize_max_chars"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(cli)
