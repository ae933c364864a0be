"""Workloads for the routing benchmark, generated offline and replayed identically.

A :class:`Workload` is a list of chat requests plus a unit-rate arrival pattern. It is a pure
function of its parameters and seed (no wall clock, no global RNG), is saved as JSON once and
replayed from that file, so every contender (each strategy, Envoy round-robin, the Rust routers)
gets byte-identical request bodies in the same order at the same offsets.

Three kinds:

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

``multi-turn`` (chat sessions)
    Conversations of several turns. Every turn resends the whole history (system prompt, earlier
    questions and answers) plus a new question, so a session's prompt grows each turn and its
    previous turn's prompt is an exact prefix of it: a router that keeps a session on the server
    that served its last turn finds the history in that server's KV cache. Sessions start as a
    Poisson process; a session's next turn follows its previous one after a think time. The
    body's ``user`` field names the session (the OpenAI API's end-user id), as an application
    would send it. The arrival process starts in steady state (sessions already under way at
    time 0), so there is no ramp-up.

Variants by parameter (see the defaults below): ``sharegpt`` with ``long_fraction`` mixes in
long-context prompts; ``shared-prefix`` with ``zipf`` > 0 draws groups with Zipf popularity
(with many groups whose prefixes together exceed the fleet's KV cache: eviction pressure).

Text is built from lower-case words of at most six letters joined by single spaces. Under the
simulator's tokenizer (and, roughly, under a BPE tokenizer) each such word is exactly one token,
so ``n`` words give an ``n``-token message and the lengths below are token counts.

Arrivals: ``unit_gaps`` are i.i.d. Gamma(shape=burstiness, scale=1/burstiness) gaps with mean
1 (vLLM's ``--burstiness``: 1 = Poisson, < 1 burstier, > 1 more regular). A run at ``rate``
requests/s sends request ``i`` at ``sum(unit_gaps[:i+1]) / rate``, so every load point replays
the same pattern, only stretched.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 = no sessions
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
    prompt_words: int = 0  # system + history + user words (≈ tokens, template excluded)
    session: int | None = None  # multi-turn: index into Workload.sessions
    turn: int = 0  # multi-turn: earlier turns of the session are resent as history


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
    # multi-turn: per session, per turn [question, answer]; the answers stand in for what the
    # server generated and are resent as the assistant messages of later turns.
    sessions: list[list[list[str]]] = field(default_factory=list)
    version: int = FORMAT_VERSION
    _digest: str | None = field(default=None, repr=False, compare=False)

    # -------------------------------------------------------------- bodies and schedule
    def messages(self, req: Request) -> list[dict[str, str]]:
        msgs = []
        if req.system is not None:
            msgs.append({"role": "system", "content": self.systems[req.system]})
        if req.session is not None:
            for question, answer in self.sessions[req.session][: req.turn]:
                msgs.append({"role": "user", "content": question})
                msgs.append({"role": "assistant", "content": answer})
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
        if req.session is not None and self.params.get("user_field", False):
            b["user"] = f"session-{req.session}"
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
            "sessions": self.sessions,
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
        if d.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"workload format {d.get('version')!r}, expected one of {READABLE_VERSIONS}"
            )
        return cls(
            name=d["name"],
            kind=d["kind"],
            seed=d["seed"],
            params=d["params"],
            systems=list(d["systems"]),
            requests=[Request(**r) for r in d["requests"]],
            unit_gaps=[float(g) for g in d["unit_gaps"]],
            burstiness=float(d["burstiness"]),
            sessions=[[list(t) for t in sess] for sess in d.get("sessions", [])],
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
    # long-context mix: this fraction of prompts gets a uniform length in [long_min, long_max]
    # instead (drawn from its own random stream: 0 leaves the plain mix unchanged).
    "long_fraction": 0.0,
    "long_min": 3000,
    "long_max": 6000,
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
    long_rng = random.Random(f"long:{seed}")
    reqs = []
    for i in range(n):
        nin = lognormal_int(
            rng, p["input_median"], p["input_sigma"], p["input_min"], p["input_max"]
        )
        extra = 0
        if p["long_fraction"] > 0 and long_rng.random() < p["long_fraction"]:
            extra = max(0, long_rng.randint(int(p["long_min"]), int(p["long_max"])) - nin)
        nout = lognormal_int(
            rng, p["output_median"], p["output_sigma"], p["output_min"], p["output_max"]
        )
        nout = max(1, int(round(nout * p["output_scale"])))
        # The request number first: prompts never share more than the chat template.
        text = f"q{i} " + words(rng, max(0, nin - 1)) if nin > 1 else f"q{i}"
        if extra:  # a long prompt: the plain one continued from the long stream
            text += " " + words(long_rng, extra)
            nin += extra
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
    # group popularity: 0 = uniform; s > 0 = Zipf, group k drawn with weight 1 / (k + 1) ** s
    "zipf": 0.0,
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

    cum = list(itertools.accumulate(1.0 / (k + 1) ** float(p["zipf"]) for k in range(g)))
    reqs = []
    for i in range(n):
        if p["zipf"] > 0:
            grp = bisect.bisect_right(cum, rng.random() * cum[-1])
        else:
            grp = rng.randrange(g)  # the uniform stream of earlier versions, unchanged
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


MULTI_TURN_DEFAULTS: dict[str, Any] = {
    "system_prompt_len": 200,  # one application prompt shared by every session
    "turns_min": 2,
    "turns_max": 10,  # turns per session: uniform in [min, max]
    "question_median": 60,
    "question_sigma": 0.6,
    "answer_median": 120,
    "answer_sigma": 0.6,
    "answer_max": 400,
    "output_scale": 1.0,
    # think time between a session's turns, in mean inter-arrival gaps of the whole workload
    # (it stretches with the load like every other gap): think_min + Exp(think_mean).
    "think_min": 20.0,
    "think_mean": 40.0,
    "user_field": True,  # send the session id as the body's `user`
}


def multi_turn(
    n: int, seed: int, *, burstiness: float = 1.0, name: str = "multi-turn", **overrides: Any
) -> Workload:
    """Chat sessions whose history grows each turn (see the module docstring).

    Sessions start as a Poisson process whose rate makes the whole workload one request per
    unit of time on average; sessions are also started before time 0 (only their turns after
    it are kept), so the number of sessions under way is stationary from the first request.
    ``burstiness`` shapes the gaps between session starts. Each session's text comes from its
    own random stream, so it does not depend on ``n``.
    """
    p = {**MULTI_TURN_DEFAULTS, **overrides}
    unknown = set(p) - set(MULTI_TURN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown multi-turn parameters: {sorted(unknown)}")
    tmin, tmax = int(p["turns_min"]), int(p["turns_max"])
    if not 1 <= tmin <= tmax:
        raise ValueError("need 1 <= turns_min <= turns_max")
    mean_turns = (tmin + tmax) / 2
    span = tmax * (float(p["think_min"]) + 4 * float(p["think_mean"]))  # ~ a long session
    starts = random.Random(f"multi-turn-starts:{seed}")
    sys_rng = random.Random(f"multi-turn-system:{seed}")
    system = "app " + words(sys_rng, int(p["system_prompt_len"]) - 1)
    sessions: list[list[list[str]]] = []
    timed: list[tuple[float, int, int]] = []  # (time, session, turn)
    t = -span
    # Enough sessions that the first n requests in time order are all generated (the last
    # session to start begins well after the n-th request's time, n / 1 on average).
    while t < n * 1.1 + 50 or len(timed) < n:
        t += starts.gammavariate(burstiness, 1.0 / burstiness) * mean_turns
        k = len(sessions)
        rng = random.Random(f"multi-turn-session:{seed}:{k}")
        turns = []
        at = t
        for turn in range(rng.randint(tmin, tmax)):
            if turn:
                at += float(p["think_min"]) + rng.expovariate(1.0 / float(p["think_mean"]))
            q = lognormal_int(rng, p["question_median"], p["question_sigma"], 2, 2000)
            a = lognormal_int(rng, p["answer_median"], p["answer_sigma"], 2, int(p["answer_max"]))
            a = max(1, int(round(a * float(p["output_scale"]))))
            # The session and turn number first: no two questions share more than the history.
            turns.append([f"s{k} t{turn} " + words(rng, max(0, q - 2)), words(rng, a)])
            if at >= 0:
                timed.append((at, k, turn))
        sessions.append(turns)
    timed.sort()
    timed = timed[:n]
    reqs = []
    for i, (_, k, turn) in enumerate(timed):
        hist = sum(len(qa[0].split()) + len(qa[1].split()) for qa in sessions[k][:turn])
        question, answer = sessions[k][turn]
        reqs.append(
            Request(
                id=i,
                user=question,
                max_tokens=len(answer.split()),
                system=0,
                prompt_words=int(p["system_prompt_len"]) + hist + len(question.split()),
                session=k,
                turn=turn,
            )
        )
    times = [x[0] for x in timed]
    gaps = [b - a for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    mean_gap = sum(gaps) / len(gaps) if gaps else 1.0
    # Only the turns up to the last one sent are needed (history); the rest would only make
    # the file bigger. Session ids stay as generated.
    last = {}
    for r in reqs:
        last[r.session] = max(last.get(r.session, -1), r.turn)
    sessions = [sess[: last.get(k, -1) + 1] for k, sess in enumerate(sessions)]
    return Workload(
        name=name,
        kind="multi-turn",
        seed=seed,
        params=p,
        systems=[system],
        requests=reqs,
        unit_gaps=[g / mean_gap for g in gaps],  # mean exactly 1: the rate is what is asked
        burstiness=burstiness,
        sessions=sessions,
    )


GENERATORS = {"sharegpt": sharegpt_like, "shared-prefix": shared_prefix, "multi-turn": multi_turn}


def generate(kind: str, n: int, seed: int, **kw: Any) -> Workload:
    try:
        gen = GENERATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown workload kind {kind!r}; valid: {', '.join(GENERATORS)}"
        ) from None
    return gen(n, seed, **kw)
