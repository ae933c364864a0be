"""Settings sources (flag > env > file > default, merged by pydantic-settings) and readable errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic_settings import EnvSettingsSource, SettingsError

from extproc.cli import build_parser
from extproc.config import ConfigError, Settings, load_settings


@pytest.fixture(autouse=True)
def _no_extproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only what a test sets counts: an EXTPROC_* of the shell running the tests would leak in.
    for name in list(os.environ):
        if name.startswith("EXTPROC_"):
            monkeypatch.delenv(name)


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
    s = load_settings({k: v for k, v in args.items() if k != "command"})
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


# --------------------------------------------------------------------------- the sources


def _yaml(tmp_path: Path, text: str) -> str:
    f = tmp_path / "extproc.yaml"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    "levels, expected",
    [
        ((), 0.1),
        (("file",), 0.2),
        (("file", "env"), 0.3),
        (("env",), 0.3),
        (("file", "env", "flag"), 0.4),
        (("file", "flag"), 0.4),
        (("env", "flag"), 0.4),
    ],
)
def test_each_level_beats_the_ones_below(tmp_path, monkeypatch, levels, expected):
    cli: dict[str, object] = {"scrape_interval": None}  # what argparse gives for an absent flag
    if "file" in levels:
        cli["config"] = _yaml(tmp_path, "scrape-interval: 0.2\n")
    if "env" in levels:
        monkeypatch.setenv("EXTPROC_SCRAPE_INTERVAL", "0.3")
    if "flag" in levels:
        cli["scrape_interval"] = 0.4
    s = load_settings(cli)
    assert s.scrape_interval == expected
    # A default is not "given": profile_table() relies on that for --weights / --prefix-guard-*.
    assert ("scrape_interval" in s.model_fields_set) == bool(levels)
    assert "weights" not in s.model_fields_set


def test_the_file_can_come_from_the_environment_and_the_flag_picks_another(tmp_path, monkeypatch):
    (tmp_path / "env.yaml").write_text("strategy: throughput\n")
    (tmp_path / "flag.yaml").write_text("strategy: least-kv-cache\n")
    monkeypatch.setenv("EXTPROC_CONFIG", str(tmp_path / "env.yaml"))
    assert load_settings({}).strategy == "throughput"
    assert Settings().strategy == "throughput"  # the sources belong to Settings itself
    flagged = load_settings({"config": str(tmp_path / "flag.yaml")})
    assert (flagged.strategy, flagged.config) == ("least-kv-cache", str(tmp_path / "flag.yaml"))


def test_yaml_keys_with_dash_or_underscore_and_profiles(tmp_path):
    path = _yaml(
        tmp_path,
        "scrape-connect-timeout: 0.3\nscrape_timeout: 0.6\nk8s-selector: app=vllm\n"
        "k8s_target_port: [8000, '8001,8002']\nexpose-routing-headers: false\n"
        "strategy: mine\nprofiles:\n  mine: {scorers: {queue: 1, kv: 2}}\n",
    )
    s = load_settings({}, path)
    assert (s.scrape_connect_timeout, s.scrape_timeout) == (0.3, 0.6)
    assert (s.k8s_selector, s.k8s_target_port) == ("app=vllm", [8000, 8001, 8002])
    assert s.expose_routing_headers is False
    assert s.profile_table()["mine"].weights == {"queue": 1, "kv": 2}


def test_profiles_from_the_environment_replace_the_files_whole(tmp_path, monkeypatch):
    path = _yaml(tmp_path, "profiles:\n  a: {scorers: {queue: 1}}\n  b: {scorers: {kv: 1}}\n")
    monkeypatch.setenv("EXTPROC_PROFILES", "c: {scorers: {prefix: 1}}")  # YAML text, as the flag
    s = load_settings({}, path)
    assert s.profiles == {"c": {"scorers": {"prefix": 1}}}  # not deep-merged with a and b
    monkeypatch.setenv("EXTPROC_PROFILES", "{unclosed")
    with pytest.raises(ConfigError, match=r"invalid settings:\n  profiles: .*not JSON/YAML"):
        load_settings({}, path)


def test_environment_lists_and_bad_values(monkeypatch):
    monkeypatch.setenv("EXTPROC_BACKENDS_DNS", "vllm-a:8000,vllm-b:8000")
    monkeypatch.setenv("EXTPROC_KV_EVENTS_ENDPOINT", "10.0.0.1:80=ipc:///tmp/a")
    s = load_settings({})
    assert s.backends_dns == ["vllm-a:8000", "vllm-b:8000"]
    assert s.kv_events_endpoint == ["10.0.0.1:80=ipc:///tmp/a"]
    monkeypatch.delenv("EXTPROC_BACKENDS_DNS")
    monkeypatch.delenv("EXTPROC_KV_EVENTS_ENDPOINT")
    monkeypatch.setenv("EXTPROC_K8S_SELECTOR", "app=vllm")
    monkeypatch.setenv("EXTPROC_K8S_TARGET_PORT", "8000, 8001")
    assert load_settings({}).k8s_target_port == [8000, 8001]
    monkeypatch.setenv("EXTPROC_SCRAPE_INTERVAL", "fast")
    with pytest.raises(ConfigError, match=r"invalid settings:\n  scrape_interval: "):
        load_settings({})


@pytest.mark.parametrize(
    "text, message",
    [
        ("strategy: [unclosed\n", "cannot read --config .*extproc.yaml"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("just text\n", "must be a YAML mapping"),
        ("scrape-intervall: 0.2\n", r"invalid settings:\n  scrape_intervall: Extra inputs"),
        ("1: x\n", r"invalid settings:\n  1: Extra inputs"),
        ("config: other.yaml\n", "'config' cannot be set inside the file"),
        ("scrape-interval: 0\n", r"invalid settings:\n  scrape_interval: "),
    ],
)
def test_bad_files_are_readable(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({}, _yaml(tmp_path, text))


def test_empty_file_means_defaults(tmp_path):
    assert load_settings({}, _yaml(tmp_path, "")).scrape_interval == 0.1


def test_unreadable_config_paths(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read --config .*missing\.yaml: .*No such file"):
        load_settings({}, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="cannot read --config .*Is a directory"):
        load_settings({"config": str(tmp_path)})


def test_a_source_that_cannot_decode_is_a_config_error(monkeypatch):
    # Every list/dict field is NoDecode today, so no EXTPROC_* value makes the environment
    # source fail; a future complex field would: its SettingsError must still read well.
    def undecodable(self):
        raise SettingsError('error parsing value for field "x" from source "EnvSettingsSource"')

    monkeypatch.setattr(EnvSettingsSource, "__call__", undecodable)
    with pytest.raises(ConfigError, match='invalid settings:\n  error parsing value for field "x"'):
        load_settings({})
