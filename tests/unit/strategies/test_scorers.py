"""extproc/strategies/scorers/__init__.py: scorer discovery, one scorer per module."""

from __future__ import annotations

import pytest

from extproc.strategies import SCORERS


def test_scorers_are_discovered_one_per_module():
    assert {"queue", "kv", "throughput", "latency", "prefix", "lora", "session"} <= set(SCORERS)
    assert all(s.doc for s in SCORERS.values())
    assert not SCORERS["prefix"].needs_metrics and SCORERS["queue"].needs_metrics


def test_a_module_without_scorer_is_skipped_and_a_duplicate_name_refused(monkeypatch):
    import pkgutil
    import types

    from extproc.strategies import scorers

    fake = {
        "helper": types.SimpleNamespace(),
        "a": types.SimpleNamespace(SCORER=SCORERS["queue"]),
        "b": types.SimpleNamespace(SCORER=SCORERS["queue"]),
    }
    monkeypatch.setattr(
        pkgutil, "iter_modules", lambda path: [types.SimpleNamespace(name=n) for n in fake]
    )
    monkeypatch.setattr(
        scorers.importlib, "import_module", lambda name: fake[name.rsplit(".", 1)[1]]
    )
    with pytest.raises(RuntimeError, match="two scorers are named 'queue'"):
        scorers._discover()
    del fake["b"]
    assert list(scorers._discover()) == ["queue"]
