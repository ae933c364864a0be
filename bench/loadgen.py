"""Open-loop load generator for OpenAI-compatible servers (streaming chat completions).

Replays a :class:`bench.workloads.Workload` against any base URL: request ``i`` is sent at its
scheduled offset (Poisson or bursty arrivals, see workloads.py) whether or not earlier requests
finished (open loop, as vLLM's ``benchmark_serving`` and inference-perf do), so an overloaded
server shows up as growing latency instead of a slower client.

Per request it measures, from the client's clock (``time.perf_counter``):

* TTFT: send -> first SSE chunk that carries generated text;
* ITL: gaps between successive text chunks (vLLM's benchmark definition: per chunk; the
  number of chunks is recorded, so chunks carrying several tokens are visible);
* e2e latency: send -> end of the stream (``data: [DONE]``);
* output tokens: ``usage.completion_tokens`` (``stream_options.include_usage``), else chunks;
* the backend that served it (response header ``x-inference-pod``, set by the simulator and
  passed through by every router) and, when present, ``x-routing-strategy``/``-reason``;
* errors: HTTP status >= 400, connection errors, a stream that ends without ``[DONE]``, a
  per-request timeout, or the run's hard deadline.

Every run is bounded: each request has a timeout and the whole run a hard deadline after
which everything still open is cancelled and counted as an error.

CLI (replay against any URL; the routing benchmark uses the functions directly)::

    python bench/loadgen.py generate --kind shared-prefix -n 2000 --seed 1 -o wl.json
    python bench/loadgen.py run --url http://127.0.0.1:10000 --workload wl.json --rate 20 \
        -n 400 [--time-scale 1] [--header x-routing-strategy:least-request] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.workloads import GENERATORS, Workload, generate  # noqa: E402

CHAT_PATH = "/v1/chat/completions"
POD_HEADER = "x-inference-pod"


# ================================================================================ SSE parsing
class SSEParser:
    """Incremental Server-Sent-Events splitter: bytes in, ``data:`` payloads out.

    Handles events split across reads, several events per read, ``\\r\\n`` line ends and
    multi-line ``data:`` fields (joined with ``\\n``, per the SSE spec). Comments and other
    fields (``event:``, ``id:``) are ignored.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:  # blank line = end of event
                if self._data:
                    out.append(b"\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b"data:"):
                v = line[5:]
                self._data.append(v[1:] if v.startswith(b" ") else v)
            # other fields and ":" comments are ignored
        self._buf = buf[start:]
        return out

    def flush(self) -> list[bytes]:
        """End of stream: an unterminated last event still counts (lenient, like curl)."""
        rest = self.feed(b"\n\n") if self._buf or self._data else []
        self._buf = b""
        return rest


@dataclass(slots=True)
class StreamTimings:
    """What one streamed response looked like, on the client's clock (seconds)."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # text-carrying chunks
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    done: bool = False
    error: str | None = None  # an error object inside the stream
    finish_reason: str | None = None

    def failure(self) -> str | None:
        """Why the finished stream does not count as a success (None: it does)."""
        if self.error:
            return f"stream error: {self.error}"
        if not self.done:
            return "incomplete: stream ended without [DONE]"
        if self.first_token is None:
            return "empty: no generated text"
        return None

    def on_event(self, payload: bytes, t: float) -> None:
        """Account one SSE ``data`` payload received at time ``t``."""
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.error = f"bad SSE payload: {payload[:80]!r}"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)[:200]
            return
        usage = obj.get("usage")
        if isinstance(usage, dict):
            ct = usage.get("completion_tokens")
            if isinstance(ct, int):
                self.usage_completion_tokens = ct
            pt = usage.get("prompt_tokens")
            if isinstance(pt, int):
                self.usage_prompt_tokens = pt
        for ch in obj.get("choices") or ():
            if not isinstance(ch, dict):
                continue
            delta = ch.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else ch.get("text")
            if text:
                if self.first_token is None:
                    self.first_token = t
                self.last_token = t
                self.chunk_times.append(t)
            fr = ch.get("finish_reason")
            if fr:
                self.finish_reason = fr

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    def itls(self) -> list[float]:
        ts = self.chunk_times
        return [b - a for a, b in zip(ts, ts[1:], strict=False)]

    @property
    def output_tokens(self) -> int:
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.chunk_times)


# ================================================================================ results
@dataclass(slots=True)
class RequestResult:
    id: int
    scheduled: float  # planned offset from the run start (s)
    sent: float  # actual offset from the run start (s)
    ok: bool
    status: int = 0
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    prompt_tokens: int | None = None
    backend: str | None = None
    routing_strategy: str | None = None
    routing_reason: str | None = None
    group: int | None = None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["itls"] = [round(x, 6) for x in self.itls]
        return d


@dataclass
class RunResult:
    results: list[RequestResult]
    wall_s: float  # first send -> last completion (or deadline)
    hit_deadline: bool
    started_at: float  # time.time() of the start
    lag_p99_s: float  # how late the client sent requests vs their schedule (its own health)


# ================================================================================ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); ``q`` in [0, 100]; NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def summarize(
    results: Sequence[RequestResult],
    *,
    wall_s: float,
    time_scale: float = 1.0,
    pods: Iterable[str] = (),
) -> dict[str, Any]:
    """Aggregate a run. Latencies are multiplied by ``time_scale`` (simulated seconds per wall
    second), rates divided by it, so every number is in *simulated* time."""
    s = time_scale
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * s for r in ok if r.ttft is not None]
    e2e = [r.e2e * s for r in ok if r.e2e is not None]
    itl = [x * s for r in ok for x in r.itls]
    tpot = [r.tpot * s for r in ok if r.tpot is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    sim_duration = wall_s * s
    errors = Counter((r.error or f"http {r.status}").split(":")[0] for r in results if not r.ok)
    backends = Counter(r.backend or "?" for r in ok)
    for p in pods:
        backends.setdefault(p, 0)
    n_ok = len(ok)

    def pcts(xs: list[float]) -> dict[str, float]:
        return {
            "mean": mean(xs),
            "p50": percentile(xs, 50),
            "p90": percentile(xs, 90),
            "p99": percentile(xs, 99),
            "max": max(xs) if xs else math.nan,
        }

    short = sum(
        1 for r in ok if r.expected_output_tokens and r.output_tokens < r.expected_output_tokens
    )
    return {
        "requests": len(results),
        "completed": n_ok,
        "errors": len(results) - n_ok,
        "error_kinds": dict(errors),
        "short_outputs": short,
        "duration_s": sim_duration,
        "throughput_rps": n_ok / sim_duration if sim_duration > 0 else math.nan,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / sim_duration if sim_duration > 0 else math.nan,
        "ttft_s": pcts(ttft),
        "itl_s": pcts(itl),
        "tpot_s": pcts(tpot),
        "e2e_s": pcts(e2e),
        "chunks_per_token": (sum(r.chunks for r in ok) / out_tokens) if out_tokens else math.nan,
        "backend_share": {k: v / n_ok if n_ok else 0.0 for k, v in sorted(backends.items())},
        "routing_reasons": dict(Counter(r.routing_reason for r in ok if r.routing_reason)),
    }


# ================================================================================ the client
async def _one(
    session: Any,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    rid: int,
    scheduled: float,
    t0: float,
    timeout: float,
    expected: int,
    group: int | None,
) -> RequestResult:
    import aiohttp

    sent_at = time.perf_counter()
    res = RequestResult(
        id=rid,
        scheduled=scheduled,
        sent=sent_at - t0,
        ok=False,
        expected_output_tokens=expected,
        group=group,
    )
    st = StreamTimings(start=sent_at)
    parser = SSEParser()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url, data=body, headers=headers) as resp:
                res.status = resp.status
                h = resp.headers
                res.backend = h.get(POD_HEADER)
                res.routing_strategy = h.get("x-routing-strategy")
                res.routing_reason = h.get("x-routing-reason")
                if resp.status >= 400:
                    text = (await resp.read())[:300].decode("utf-8", "replace")
                    res.error = f"http {resp.status}: {text}"
                    return res
                async for chunk in resp.content.iter_any():
                    t = time.perf_counter()
                    for ev in parser.feed(chunk):
                        st.on_event(ev, t)
                t = time.perf_counter()
                for ev in parser.flush():
                    st.on_event(ev, t)
                end = time.perf_counter()
    except TimeoutError:
        res.error = "timeout: request exceeded its timeout"
        _fill(res, st, None)
        return res
    except asyncio.CancelledError:
        res.error = "deadline: cancelled at the run's hard deadline"
        _fill(res, st, None)
        raise
    except (aiohttp.ClientError, OSError) as exc:
        res.error = f"connection: {type(exc).__name__}: {exc}"[:300]
        _fill(res, st, None)
        return res
    _fill(res, st, end)
    res.error = st.failure()
    res.ok = res.error is None
    return res


def _fill(res: RequestResult, st: StreamTimings, end: float | None) -> None:
    res.ttft = st.ttft
    res.e2e = None if end is None else end - st.start
    res.itls = st.itls()
    res.chunks = len(st.chunk_times)
    res.output_tokens = st.output_tokens
    res.prompt_tokens = st.usage_prompt_tokens


ProgressFn = Callable[[int, int, int], None]  # (sent, done, errors)


async def run_load(
    base_url: str,
    workload: Workload,
    *,
    rate: float,
    n: int,
    headers: Mapping[str, str] | None = None,
    request_timeout: float = 120.0,
    deadline: float | None = None,
    progress: ProgressFn | None = None,
    path: str = CHAT_PATH,
) -> RunResult:
    """Send the first ``n`` requests of ``workload`` at ``rate`` req/s (open loop).

    ``deadline``: hard wall-clock bound for the whole run (s from the start, default: last
    scheduled send + ``request_timeout``); whatever is still running then is cancelled and
    reported as an error of kind ``deadline``.
    """
    import aiohttp

    offsets = workload.offsets(rate, n)
    reqs = workload.requests[:n]
    bodies = [orjson.dumps(workload.body(r)) for r in reqs]  # serialised before the clock starts
    hdrs = {"content-type": "application/json", **(headers or {})}
    url = base_url.rstrip("/") + path
    if deadline is None:
        deadline = (offsets[-1] if offsets else 0.0) + request_timeout
    connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    results: list[RequestResult | None] = [None] * len(reqs)
    lags: list[float] = []
    done = errors = 0
    hit_deadline = False

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        started_at = time.time()
        tasks: list[asyncio.Task[RequestResult]] = []
        all_done = asyncio.Event()
        send_task_done = [False]

        def finished(i: int, task: asyncio.Task[RequestResult]) -> None:
            nonlocal done, errors
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:  # a bug, not a server failure: keep it visible
                r = RequestResult(
                    id=reqs[i].id,
                    scheduled=offsets[i],
                    sent=math.nan,
                    ok=False,
                    error=f"client: {type(exc).__name__}: {exc}"[:300],
                )
            else:
                r = task.result()
            results[i] = r
            done += 1
            errors += 0 if r.ok else 1
            check_all_done()

        def check_all_done() -> None:
            if done == len(reqs) and (not reqs or send_task_done[0]):
                all_done.set()

        async def sender() -> None:
            for i, (req, off, body) in enumerate(zip(reqs, offsets, bodies, strict=True)):
                delay = t0 + off - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                lags.append(time.perf_counter() - (t0 + off))
                task = loop.create_task(
                    _one(
                        session,
                        url,
                        body,
                        hdrs,
                        rid=req.id,
                        scheduled=off,
                        t0=t0,
                        timeout=request_timeout,
                        expected=req.max_tokens,
                        group=req.group,
                    )
                )
                task.add_done_callback(lambda t, i=i: finished(i, t))
                tasks.append(task)
                if progress is not None and (i & 7) == 0:
                    progress(i + 1, done, errors)

        send_task = loop.create_task(sender())

        def _sender_done(_t: asyncio.Task[None]) -> None:
            send_task_done[0] = True
            check_all_done()

        send_task.add_done_callback(_sender_done)
        hard_end = t0 + deadline
        # Wait for "everything finished" (an event, not a guessed sleep), waking every 0.25 s
        # to report progress, until the hard deadline.
        while not all_done.is_set():
            remaining = hard_end - time.perf_counter()
            if remaining <= 0:
                hit_deadline = True
                break
            if progress is not None:
                progress(len(tasks), done, errors)
            try:
                await asyncio.wait_for(all_done.wait(), timeout=min(0.25, remaining))
            except TimeoutError:
                pass
        wall = time.perf_counter() - t0
        if not send_task.done():
            send_task.cancel()
        for t in tasks:
            if not t.done():
                t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Requests never sent (deadline hit before their slot) or cancelled: errors.
        for i, r in enumerate(results):
            if r is None:
                results[i] = RequestResult(
                    id=reqs[i].id,
                    scheduled=offsets[i],
                    sent=math.nan,
                    ok=False,
                    error="deadline: not finished (or not sent) before the run's hard deadline",
                    expected_output_tokens=reqs[i].max_tokens,
                    group=reqs[i].group,
                )
        if progress is not None:
            progress(len(tasks), done, errors)
    final = [r for r in results if r is not None]
    return RunResult(
        results=final,
        wall_s=wall,
        hit_deadline=hit_deadline,
        started_at=started_at,
        lag_p99_s=percentile(lags, 99) if lags else 0.0,
    )


async def run_closed_loop(
    base_url: str,
    workload: Workload,
    *,
    concurrency: int,
    n: int,
    headers: Mapping[str, str] | None = None,
    request_timeout: float = 120.0,
    deadline: float = 120.0,
    path: str = CHAT_PATH,
) -> RunResult:
    """Keep ``concurrency`` requests outstanding until ``n`` were sent (capacity calibration:
    a permanent backlog makes the completion rate the fleet's maximum throughput)."""
    import aiohttp

    reqs = workload.requests[:n]
    bodies = [orjson.dumps(workload.body(r)) for r in reqs]
    hdrs = {"content-type": "application/json", **(headers or {})}
    url = base_url.rstrip("/") + path
    connector = aiohttp.TCPConnector(limit=0)
    results: list[RequestResult] = []
    next_i = 0
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        t0 = time.perf_counter()
        started_at = time.time()

        async def worker() -> None:
            nonlocal next_i
            while next_i < len(reqs):
                i = next_i
                next_i += 1
                now = time.perf_counter() - t0
                results.append(
                    await _one(
                        session,
                        url,
                        bodies[i],
                        hdrs,
                        rid=reqs[i].id,
                        scheduled=now,
                        t0=t0,
                        timeout=request_timeout,
                        expected=reqs[i].max_tokens,
                        group=reqs[i].group,
                    )
                )

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(workers, timeout=deadline)
        hit = bool(pending)
        for w in pending:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        wall = time.perf_counter() - t0
    return RunResult(
        results=results, wall_s=wall, hit_deadline=hit, started_at=started_at, lag_p99_s=0.0
    )


def saturated_throughput(results: Sequence[RequestResult], concurrency: int) -> tuple[float, float]:
    """(requests/s, output tokens/s) in wall time while the closed loop kept every slot busy:
    completions between the first quarter of the run and the moment the last request was sent
    (after that the backlog drains and the rate falls)."""
    done = sorted((r.sent + r.e2e, r.output_tokens) for r in results if r.ok and r.e2e is not None)
    if len(done) < 8:
        return math.nan, math.nan
    last_send = max(r.sent for r in results)
    a = done[len(done) // 4][0]
    b = max(a, last_send)
    window = [d for d in done if a < d[0] <= b]
    span = b - a
    if span <= 0 or len(window) < 4:
        return math.nan, math.nan
    return len(window) / span, sum(t for _, t in window) / span


# ================================================================================ CLI
def _parse_headers(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition(":")
        if not sep:
            raise SystemExit(f"--header {item!r}: expected NAME:VALUE")
        out[k.strip().lower()] = v.strip()
    return out


def format_summary(s: dict[str, Any]) -> str:
    ms = 1000.0
    t, i, e = s["ttft_s"], s["itl_s"], s["e2e_s"]
    return (
        f"ok {s['completed']}/{s['requests']}  errors {s['errors']}  "
        f"TTFT p50/p90/p99 {t['p50'] * ms:.0f}/{t['p90'] * ms:.0f}/{t['p99'] * ms:.0f} ms  "
        f"ITL p90 {i['p90'] * ms:.1f} ms  e2e p90 {e['p90']:.2f} s  "
        f"{s['output_tokens_per_s']:.0f} tok/s  {s['throughput_rps']:.2f} req/s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a workload JSON")
    g.add_argument("--kind", choices=sorted(GENERATORS), required=True)
    g.add_argument("-n", type=int, default=1000)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("-o", "--out", type=Path, required=True)
    r = sub.add_parser("run", help="replay a workload against an OpenAI-compatible base URL")
    r.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:10000")
    r.add_argument("--workload", type=Path, required=True)
    r.add_argument("--rate", type=float, required=True, help="requests per (wall) second")
    r.add_argument("-n", type=int, default=None, help="number of requests (default: all)")
    r.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated s per wall s of the server (vllmsim --time-scale); "
        "latencies are reported multiplied by it",
    )
    r.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    r.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    r.add_argument("--deadline", type=float, default=None, help="hard bound of the run (s)")
    r.add_argument("--json", type=Path, default=None, help="write summary + per-request results")
    a = ap.parse_args(argv)

    if a.cmd == "generate":
        wl = generate(a.kind, a.n, a.seed, burstiness=a.burstiness)
        wl.save(a.out)
        print(f"{a.out}: {wl.kind} n={len(wl.requests)} sha256={wl.digest()[:16]} {wl.stats()}")
        return 0

    wl = Workload.load(a.workload)
    n = a.n or len(wl.requests)

    def progress(sent: int, done: int, errors: int) -> None:
        print(f"\rsent {sent}/{n} done {done} errors {errors}", end="", file=sys.stderr, flush=True)

    run = asyncio.run(
        run_load(
            a.url,
            wl,
            rate=a.rate,
            n=n,
            headers=_parse_headers(a.header),
            request_timeout=a.timeout,
            deadline=a.deadline,
            progress=progress,
        )
    )
    print(file=sys.stderr)
    summary = summarize(run.results, wall_s=run.wall_s, time_scale=a.time_scale)
    print(format_summary(summary))
    if a.json:
        a.json.write_bytes(
            orjson.dumps(
                {
                    "summary": summary,
                    "wall_s": run.wall_s,
                    "hit_deadline": run.hit_deadline,
                    "results": [x.to_dict() for x in run.results],
                },
                option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
            )
        )
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
