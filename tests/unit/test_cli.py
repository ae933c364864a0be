"""``extproc serve``: flags built from the Settings fields, fed to the settings sources."""

from __future__ import annotations

import os

import pytest

from extproc.cli import build_parser, main
from extproc.config import Settings, load_settings


@pytest.fixture(autouse=True)
def _no_extproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXTPROC_"):
            monkeypatch.delenv(name)


def _settings(argv: list[str]) -> Settings:
    args = vars(build_parser().parse_args(["serve", *argv]))
    args.pop("command")
    return load_settings(args)


def test_repeatable_flags():
    args = vars(
        build_parser().parse_args(["serve", "--backend", "http://a:1", "--backend", "http://b:2"])
    )
    assert args["backend"] == ["http://a:1", "http://b:2"]


def test_every_field_is_a_flag_with_its_description_and_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "precedence: flag > environment > file > default" in out
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in out
    assert "--config CONFIG YAML file with settings" in out
    assert "(default: '')" in out and "(default: 127.0.0.1:9002)" in out


def test_flags_beat_environment_and_file(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("expose-routing-headers: true\nstale-after: 2\nmax-metrics-age: 20\n")
    monkeypatch.setenv("EXTPROC_EXPOSE_ROUTING_HEADERS", "true")
    monkeypatch.setenv("EXTPROC_STALE_AFTER", "3")
    s = _settings(["--config", str(cfg), "--no-expose-routing-headers", "--stale-after", "4"])
    assert (s.expose_routing_headers, s.stale_after, s.max_metrics_age) == (False, 4.0, 20.0)
    # An absent flag is None and leaves the lower levels alone.
    assert _settings(["--config", str(cfg)]).stale_after == 3.0


def test_cli_exits_2_with_message_on_bad_settings(capsys):
    assert main(["serve", "--strategy", "nope"]) == 2
    assert "unknown strategy" in capsys.readouterr().err


def test_cli_exits_2_on_an_unreadable_or_bad_file(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("extproc: cannot read --config ") and "Traceback" not in err
    (tmp_path / "list.yaml").write_text("- a\n")
    assert main(["serve", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err


def test_profiles_flag_replaces_the_files_profiles(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profiles:\n  a: {scorers: {queue: 1}}\n")
    s = _settings(["--config", str(cfg), "--profiles", "b: {scorers: {kv: 1}}"])
    assert s.profiles == {"b": {"scorers": {"kv": 1}}}
    assert _settings(["--config", str(cfg)]).profiles == {"a": {"scorers": {"queue": 1}}}
