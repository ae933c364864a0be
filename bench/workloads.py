"""Workloads for the routing benchmark, generated offline and replayed identically.

A :class:`Workload` is a list of chat requests plus a unit-rate arrival pattern. It is a pure
function of its parameters and seed (no wall clock, no global RNG), is saved as JSON once and
replayed from that file, so every contender (each strategy, Envoy round-robin, the Rust routers)
gets byte-identical request bodies in the same order at the same offsets.

Two kinds:

``sharegpt`` (ShareGPT-like mix)
    Independent single-turn chats whose prompt and output lengths follow log-normal
    distributions with the shape of the ShareGPT V3 conversations vLLM's serving benchmark
    replays (heavy right tail, median well below the mean). The text is synthetic (no data set
    download); every prompt starts with request-specific words, so requests share no prefix
    beyond the chat template.

``shared-prefix`` (the Gateway API Inference Extension / inference-perf "shared_prefix" shape)
    ``num_groups`` long system prompts; each request is one group's system prompt followed by a
    short, unique question. Requests of all groups are interleaved at random, so a router that
    keeps a group on the servers that already hold its prefix in their KV cache avoids
    recomputing the system prompt.

Text is built from lower-case words of at most six letters joined by single spaces. Under the
simulator's tokenizer (and, roughly, under a BPE tokenizer) each such word is exactly one token,
so ``n`` words give an ``n``-token message and the lengths below are token counts.

Arrivals: ``unit_gaps`` are i.i.d. Gamma(shape=burstiness, scale=1/burstiness) gaps with mean
1 (vLLM's ``--burstiness``: 1 = Poisson, < 1 burstier, > 1 more regular). A run at ``rate``
requests/s sends request ``i`` at ``sum(unit_gaps[:i+1]) / rate``, so every load point replays
the same pattern, only stretched.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT_VERSION = 1
MODEL = "tiny-llama"

# 1-6 lower-case letters: one token each for the simulator's tokenizer (see vllmsim/tokenizer.py).
_WORDS: tuple[str, ...] = (
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "group",
    "RING",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "system",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "party",
    "result",
    "change",
    "reason",
    "moment",
    "air",
    "force",
    "model",
    "data",
    "code",
    "server",
    "cache",
    "token",
    "query",
    "router",
    "cloud",
    "node",
    "memory",
    "disk",
    "packet",
    "signal",
    "noise",
    "river",
    "forest",
    "stone",
    "glass",
    "paper",
    "music",
    "color",
    "light",
    "sound",
    "field",
    "market",
    "price",
    "value",
    "energy",
    "plant",
    "animal",
    "bird",
    "fish",
    "tree",
    "flower",
    "garden",
    "street",
    "bridge",
    "train",
    "plane",
    "ship",
    "road",
    "map",
    "plan",
    "test",
    "answer",
    "ask",
    "make",
    "take",
    "give",
    "find",
    "tell",
    "work",
    "call",
    "try",
    "need",
    "feel",
    "become",
    "leave",
    "put",
    "mean",
    "keep",
    "let",
    "begin",
    "seem",
    "help",
    "talk",
    "turn",
    "start",
    "show",
    "hear",
    "play",
    "run",
    "move",
    "like",
    "live",
    "hold",
    "bring",
    "write",
    "sit",
    "stand",
    "lose",
    "pay",
    "meet",
    "learn",
    "lead",
    "read",
    "grow",
    "open",
    "walk",
    "win",
    "offer",
    "spend",
    "build",
    "stay",
    "fall",
    "cut",
    "reach",
    "remain",
    "good",
    "new",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "big",
    "high",
    "small",
    "large",
    "next",
    "early",
    "young",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "clear",
    "simple",
    "quick",
    "slow",
    "strong",
    "warm",
    "cold",
    "bright",
    "dark",
)
WORDS: tuple[str, ...] = tuple(w.lower() for w in _WORDS)


# ================================================================================ data types
@dataclass(frozen=True, slots=True)
class Request:
    """One chat completion: optional shared system prompt (by index) + a user message."""

    id: int
    user: str
    max_tokens: int
    system: int | None = None  # index into Workload.systems
    group: int | None = None  # shared-prefix group (same as system), None for sharegpt
    prompt_words: int = 0  # system + user words (≈ tokens, template excluded)


@dataclass
class Workload:
    name: str
    kind: str
    seed: int
    params: dict[str, Any]
    systems: list[str]
    requests: list[Request]
    unit_gaps: list[float]
    burstiness: float = 1.0
    version: int = FORMAT_VERSION
    _digest: str | None = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------- bodies and schedule
    def messages(self, req: Request) -> list[dict[str, str]]:
        msgs = []
        if req.system is not None:
            msgs.append({"role": "system", "content": self.systems[req.system]})
        msgs.append({"role": "user", "content": req.user})
        return msgs

    def body(self, req: Request, *, model: str = MODEL, stream: bool = True) -> dict[str, Any]:
        """The OpenAI chat body. ``ignore_eos`` makes the output length exactly ``max_tokens``
        (vLLM's own benchmark does the same), so every contender generates the same tokens."""
        b: dict[str, Any] = {
            "model": model,
            "messages": self.messages(req),
            "max_tokens": req.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": stream,
        }
        if stream:
            b["stream_options"] = {"include_usage": True}
        return b

    def offsets(self, rate: float, n: int | None = None) -> list[float]:
        """Send times (s from the start) of the first ``n`` requests at ``rate`` req/s."""
        if rate <= 0:
            raise ValueError("rate must be > 0")
        n = len(self.requests) if n is None else n
        if n > len(self.unit_gaps):
            raise ValueError(f"workload has {len(self.unit_gaps)} requests, asked for {n}")
        return arrival_offsets(self.unit_gaps[:n], rate)

    # -------------------------------------------------------------- statistics
    def stats(self, n: int | None = None) -> dict[str, float]:
        reqs = self.requests[: (len(self.requests) if n is None else n)]
        pin = sorted(r.prompt_words for r in reqs)
        out = sorted(r.max_tokens for r in reqs)
        return {
            "requests": len(reqs),
            "prompt_tokens_mean": sum(pin) / len(pin),
            "prompt_tokens_p50": pin[len(pin) // 2],
            "prompt_tokens_max": pin[-1],
            "output_tokens_mean": sum(out) / len(out),
            "output_tokens_p50": out[len(out) // 2],
            "output_tokens_max": out[-1],
        }

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "kind": self.kind,
            "seed": self.seed,
            "params": self.params,
            "burstiness": self.burstiness,
            "systems": self.systems,
            "requests": [asdict(r) for r in self.requests],
            "unit_gaps": self.unit_gaps,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)

    def digest(self) -> str:
        """sha256 of the canonical JSON: equal digests = identical workloads."""
        if self._digest is None:
            self._digest = hashlib.sha256(self.to_json()).hexdigest()
        return self._digest

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"workload format {d.get('version')!r}, expected {FORMAT_VERSION}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            seed=d["seed"],
            params=d["params"],
            systems=list(d["systems"]),
            requests=[Request(**r) for r in d["requests"]],
            unit_gaps=[float(g) for g in d["unit_gaps"]],
            burstiness=float(d["burstiness"]),
        )

    @classmethod
    def load(cls, path: Path) -> Workload:
        return cls.from_dict(orjson.loads(Path(path).read_bytes()))


# ================================================================================ primitives
def words(rng: random.Random, n: int) -> str:
    """``n`` one-token words joined by spaces."""
    return " ".join(rng.choices(WORDS, k=n))


def unit_gaps(rng: random.Random, n: int, burstiness: float = 1.0) -> list[float]:
    """``n`` inter-arrival gaps with mean 1: Gamma(k=burstiness, theta=1/burstiness).

    burstiness 1 is a Poisson process (exponential gaps); smaller values are burstier
    (coefficient of variation 1/sqrt(burstiness)), as in vLLM's serving benchmark.
    """
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    return [rng.gammavariate(burstiness, 1.0 / burstiness) for _ in range(n)]


def arrival_offsets(gaps: Sequence[float], rate: float) -> list[float]:
    """Cumulative send times at ``rate`` req/s from unit-mean gaps (first one after gaps[0])."""
    out, t = [], 0.0
    for g in gaps:
        t += g / rate
        out.append(t)
    return out


def lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal draw (given median and log-space sigma), rounded and clipped to [lo, hi]."""
    v = rng.lognormvariate(math.log(median), sigma)
    return max(lo, min(hi, int(round(v))))


# ================================================================================ generators
# ShareGPT V3 (as filtered by vLLM's benchmark, Llama tokenizer): prompts median ~ 100-130
# tokens, mean ~ 220-250, outputs median ~ 120-150, mean ~ 200, both with a long tail. A
# log-normal with sigma ~ 1.0-1.2 reproduces that mean/median ratio (exp(sigma^2/2) ~ 1.6-2).
SHAREGPT_DEFAULTS: dict[str, Any] = {
    "input_median": 120,
    "input_sigma": 1.1,
    "input_min": 4,
    "input_max": 2048,
    "output_median": 120,
    "output_sigma": 0.9,
    "output_min": 4,
    "output_max": 1024,
    "output_scale": 1.0,
}


def sharegpt_like(
    n: int, seed: int, *, burstiness: float = 1.0, name: str = "sharegpt", **overrides: Any
) -> Workload:
    """ShareGPT-like independent chats (see the module docstring).

    ``output_scale`` shrinks every output length by a factor (the benchmark uses it to keep the
    token rate within what the box can stream; the distribution's shape is unchanged).
    """
    p = {**SHAREGPT_DEFAULTS, **overrides}
    unknown = set(p) - set(SHAREGPT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sharegpt parameters: {sorted(unknown)}")
    rng = random.Random(f"sharegpt:{seed}")
    reqs = []
    for i in range(n):
        nin = lognormal_int(
            rng, p["input_median"], p["input_sigma"], p["input_min"], p["input_max"]
        )
        nout = lognormal_int(
            rng, p["output_median"], p["output_sigma"], p["output_min"], p["output_max"]
        )
        nout = max(1, int(round(nout * p["output_scale"])))
        # The request number first: prompts never share more than the chat template.
        text = f"q{i} " + words(rng, max(0, nin - 1)) if nin > 1 else f"q{i}"
        reqs.append(Request(id=i, user=text, max_tokens=nout, prompt_words=nin))
    gaps = unit_gaps(random.Random(f"arrivals:{seed}"), n, burstiness)
    return Workload(
        name=name,
        kind="sharegpt",
        seed=seed,
        params=p,
        systems=[],
        requests=reqs,
        unit_gaps=gaps,
        burstiness=burstiness,
    )


SHARED_PREFIX_DEFAULTS: dict[str, Any] = {
    "num_groups": 32,
    "system_prompt_len": 1024,
    "question_len": 48,
    "output_len": 48,
    "question_len_jitter": 0.25,
    "output_len_jitter": 0.25,
}


def shared_prefix(
    n: int, seed: int, *, burstiness: float = 1.0, name: str = "shared-prefix", **overrides: Any
) -> Workload:
    """``num_groups`` system prompts of ``system_prompt_len`` tokens; each request = a random
    group's system prompt + a unique question of ~``question_len`` tokens, ~``output_len``
    output tokens (both +-jitter, uniform). Groups are drawn uniformly at random per request."""
    p = {**SHARED_PREFIX_DEFAULTS, **overrides}
    unknown = set(p) - set(SHARED_PREFIX_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown shared-prefix parameters: {sorted(unknown)}")
    rng = random.Random(f"shared-prefix:{seed}")
    g = int(p["num_groups"])
    # Each system prompt starts with its group number so groups share nothing but the template.
    systems = [f"g{k} " + words(rng, int(p["system_prompt_len"]) - 1) for k in range(g)]

    def jitter(mean: int, frac: float) -> int:
        lo, hi = max(1, int(mean * (1 - frac))), max(1, int(mean * (1 + frac)))
        return rng.randint(lo, hi)

    reqs = []
    for i in range(n):
        grp = rng.randrange(g)
        nq = jitter(int(p["question_len"]), float(p["question_len_jitter"]))
        nout = jitter(int(p["output_len"]), float(p["output_len_jitter"]))
        user = f"q{i} " + words(rng, max(0, nq - 1))
        reqs.append(
            Request(
                id=i,
                user=user,
                max_tokens=nout,
                system=grp,
                group=grp,
                prompt_words=int(p["system_prompt_len"]) + nq,
            )
        )
    gaps = unit_gaps(random.Random(f"arrivals:{seed}"), n, burstiness)
    return Workload(
        name=name,
        kind="shared-prefix",
        seed=seed,
        params=p,
        systems=systems,
        requests=reqs,
        unit_gaps=gaps,
        burstiness=burstiness,
    )


GENERATORS = {"sharegpt": sharegpt_like, "shared-prefix": shared_prefix}


def generate(kind: str, n: int, seed: int, **kw: Any) -> Workload:
    try:
        gen = GENERATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown workload kind {kind!r}; valid: {', '.join(GENERATORS)}"
        ) from None
    return gen(n, seed, **kw)
