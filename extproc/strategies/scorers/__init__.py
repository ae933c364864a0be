"""Scorers, one per module: a module here that defines ``SCORER`` (a
:class:`~extproc.strategies.base.Scorer`) is registered under ``SCORER.name``; nothing else
to edit. Profiles (``extproc/strategies/profiles.py`` or the ``profiles:`` of ``--config``)
then use it by that name.
"""

from __future__ import annotations

import importlib
import pkgutil

from extproc.strategies.base import Scorer


def _discover() -> dict[str, Scorer]:
    found: dict[str, Scorer] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        scorer = getattr(importlib.import_module(f"{__name__}.{info.name}"), "SCORER", None)
        if not isinstance(scorer, Scorer):
            continue  # a helper module
        if scorer.name in found:
            raise RuntimeError(f"two scorers are named {scorer.name!r}")
        found[scorer.name] = scorer
    return found


SCORERS: dict[str, Scorer] = _discover()
