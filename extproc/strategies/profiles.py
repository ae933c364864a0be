"""Every routing profile (what the API calls a strategy), declared here, and the one loader that
builds them: built-ins, then the ``profiles:`` of ``--config``, then the legacy flags.

A profile in YAML (the same shape as ``BUILTIN`` below)::

    profiles:
      fast-and-cached:              # a new profile, selectable like any strategy
        scorers:
          latency: 2                # scorer: weight
          prefix: {weight: 3, guard_abs: 16, guard_rel: 2}   # or weight + scorer parameters
        picker: {name: near-best, tolerance: 0.2}            # or just the picker's name
      weighted:                     # a built-in: the fields given replace the built-in's
        scorers: {queue: 1, kv: 1, prefix: 5}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from extproc.strategies.pickers import PICKERS
from extproc.strategies.profile import Profile, Use
from extproc.strategies.scorers import SCORERS

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class ScorerSpec(BaseModel):
    """A scorer's weight; every other key is one of its parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    weight: Weight = 1.0


class PickerSpec(BaseModel):
    """A picker's name; every other key is one of its parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str


class ProfileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""
    scorers: dict[str, Weight | ScorerSpec] = Field(default_factory=dict)
    picker: str | PickerSpec = "max"
    reason: str | None = None  # a scorer of this profile that names the decision's reason


class ProfileError(ValueError):
    pass


# Against herding: token rate, KV usage and TTFT lag the requests just sent (windowed over ~3 s,
# or counted only after prefill), so the profiles built on them also score the queue, whose
# in-flight count moves with every pick (docs/strategies.md: how each profile avoids herding).
BUILTIN: dict[str, ProfileSpec] = {
    name: ProfileSpec.model_validate(spec)
    for name, spec in {
        "random": {"description": "uniformly at random; load-blind", "picker": "random"},
        "round-robin": {
            "description": "the request counter modulo the candidates; load-blind",
            "picker": "round-robin",
        },
        "least-request": {
            "description": "fewest running + waiting + in-flight requests",
            "scorers": {"queue": 1},
        },
        "throughput": {
            "description": "lowest token rate, balanced with the queue",
            # The queue weighs double: a slow server moves few tokens, and must not look idle.
            "scorers": {"throughput": 1, "queue": 2},
        },
        "least-kv-cache": {
            "description": "lowest KV-cache usage, balanced with the queue",
            "scorers": {"kv": 1, "queue": 1},
        },
        "least-latency": {
            "description": "lowest expected time to first token, balanced with the queue",
            "scorers": {"latency": 1, "queue": 1},
        },
        "prefix-cache": {
            "description": "the best prefix-cache match, ties to the least loaded, with a load guard",
            "scorers": {"prefix": {"weight": 1, "guard_abs": 8, "guard_rel": 1.5}},
            "picker": {"name": "near-best", "tolerance": 0},
            "reason": "prefix",
        },
        "session": {
            "description": "the session key's server; no key: the least loaded",
            "scorers": {"session": 1},
            "picker": {"name": "near-best", "tolerance": 0},
            "reason": "session",
        },
        "weighted": {
            "description": "weighted sum of queue, KV, prefix (with the load guard) and LoRA scores",
            # The prefix outweighs queue + KV: a prefix hit saves a whole prefill, which a
            # request or two more in the holder's queue does not cost; the load guard (as in
            # prefix-cache) decides when the holder is too busy. With the Inference Extension's
            # 2/2/3 the in-flight correction moved a hot prefix off its holder after one or two
            # requests in flight (bench/results/routing-notes.md).
            "scorers": {
                "queue": 1,
                "kv": 1,
                "prefix": {"weight": 4, "guard_abs": 8, "guard_rel": 1.5},
                "lora": 1,
            },
        },
    }.items()
}


def _param(owner: str, known: Mapping[str, float], key: str, value: Any) -> float:
    if key not in known:
        raise ProfileError(
            f"{owner} has no parameter {key!r}" + (f"; known: {', '.join(known)}" if known else "")
        )
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ProfileError(f"{owner} parameter {key} must be a non-negative number, got {value!r}")
    return float(value)


def build(name: str, spec: ProfileSpec) -> Profile:
    """A :class:`Profile` from its spec; ProfileError naming the first problem."""
    uses = []
    for sname, entry in spec.scorers.items():
        scorer = SCORERS.get(sname)
        if scorer is None:
            raise ProfileError(f"unknown scorer {sname!r}; known: {', '.join(sorted(SCORERS))}")
        weight, extra = (
            (entry, {}) if isinstance(entry, float) else (entry.weight, entry.model_extra or {})
        )
        params = dict(scorer.params)
        params.update({k: _param(f"scorer {sname}", scorer.params, k, v) for k, v in extra.items()})
        if weight > 0:
            uses.append(Use(scorer, weight, params))
    pname, pextra = (
        (spec.picker, {})
        if isinstance(spec.picker, str)
        else (spec.picker.name, spec.picker.model_extra or {})
    )
    picker = PICKERS.get(pname)
    if picker is None:
        raise ProfileError(f"unknown picker {pname!r}; known: {', '.join(PICKERS)}")
    pparams = dict(picker.params)
    pparams.update({k: _param(f"picker {pname}", picker.params, k, v) for k, v in pextra.items()})
    if picker.load_blind and uses:
        raise ProfileError(
            f"picker {pname} ignores scores: drop the scorers or pick another picker"
        )
    if spec.reason is not None:
        explainers = [u.scorer.name for u in uses if u.scorer.explain is not None]
        if spec.reason not in explainers:
            raise ProfileError(
                f"reason {spec.reason!r} must be one of this profile's scorers that names reasons: "
                f"{', '.join(explainers) or 'none here'}"
            )
    return Profile(name, tuple(uses), picker, pparams, spec.reason, spec.description)


def _where(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}" for e in exc.errors()
    )


def load_profiles(
    specs: Mapping[str, Any] | None = None,
    *,
    weights: Mapping[str, float] | None = None,
    prefix_guard: Mapping[str, float] | None = None,
) -> dict[str, Profile]:
    """The profile table: built-ins < ``specs`` (the YAML ``profiles:`` mapping; for a built-in,
    the fields given replace its fields) < ``weights`` (of ``weighted``) and ``prefix_guard``
    (``guard_abs``/``guard_rel`` of ``prefix-cache``). ProfileError says what is wrong where."""
    if specs is not None and not isinstance(specs, Mapping):
        raise ProfileError("profiles must be a mapping of profile name -> profile")
    merged = dict(BUILTIN)
    for name, raw in (specs or {}).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ProfileError(
                f"profile name {name!r}: use lower-case letters, digits, '.', '_', '-' (at most 64)"
            )
        try:
            spec = ProfileSpec.model_validate(raw if raw is not None else {})
        except ValidationError as exc:
            raise ProfileError(f"profile {name}: {_where(exc)}") from None
        base = merged.get(name)
        if base is not None:
            spec = base.model_copy(update={k: getattr(spec, k) for k in spec.model_fields_set})
        merged[name] = spec
    profiles: dict[str, Profile] = {}
    for name, spec in merged.items():
        try:
            profiles[name] = build(name, spec)
        except ProfileError as exc:
            raise ProfileError(f"profile {name}: {exc}") from None
    try:
        if weights:
            profiles["weighted"] = profiles["weighted"].with_weights(weights)
        if prefix_guard:
            profiles["prefix-cache"] = profiles["prefix-cache"].with_params("prefix", prefix_guard)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    return profiles
