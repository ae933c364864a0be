"""Routing profiles (the API's "strategies"): scorers with weights plus a picker.

- ``base.py``: request facts, the decision context (with the in-flight correction), scores,
  reasons;
- ``scorers/``: one scorer per module, registered by being there;
- ``pickers.py``: how scores become one backend;
- ``profile.py``: how a profile combines them; ``profiles.py``: every built-in profile, and the
  loader that adds/overrides profiles from ``--config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from extproc.strategies.base import Context, Reason, RequestFacts, Scorer, Scores, request_loads
from extproc.strategies.pickers import PICKERS
from extproc.strategies.profile import Profile
from extproc.strategies.profiles import BUILTIN, ProfileError, load_profiles
from extproc.strategies.scorers import SCORERS

# The built-in profiles, as every request sees them unless --config or a route changes them.
STRATEGIES: Mapping[str, Profile] = MappingProxyType(load_profiles())
# Load-blind profiles that need nothing from the request: usable as --fallback.
FALLBACKS: Mapping[str, Profile] = MappingProxyType(
    {n: STRATEGIES[n] for n in ("random", "round-robin")}
)


def get_strategy(name: str, profiles: Mapping[str, Profile] = STRATEGIES) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid: {', '.join(profiles)}") from None


__all__ = [
    "BUILTIN",
    "FALLBACKS",
    "PICKERS",
    "SCORERS",
    "STRATEGIES",
    "Context",
    "Profile",
    "ProfileError",
    "Reason",
    "RequestFacts",
    "Scorer",
    "Scores",
    "get_strategy",
    "load_profiles",
    "request_loads",
]
