"""Cost of the exact prefix index per request, and its memory per server.

Run: ``python bench/bench_tokenize.py`` (a minute). Writes bench/results/tokenize.{json,md}.

Per request the service (extproc/kv_prefix.py) renders the chat template and tokenizes the prompt
once, hashes its blocks once per block size, then does O(log n) dictionary lookups per server
with events. Chat text between the tokenizer's special tokens (messages) is cached per segment,
and at most ``--tokenize-max-chars`` (default 8,192) characters of NEW text are tokenized per
request. Measured here, CPU time per request (``time.process_time``, GC off, median of repeats),
prompts cut from the repository's English docs (distinct per request, so the per-prompt cache
never hits):

- ``unique N``: a chat request of N characters nobody sent before (the worst case: everything
  is new text, tokenized up to the cap);
- ``shared S + question``: an S-character system prompt every request shares plus a distinct
  ~300-character question (the system prompt's ids come from the segment cache);
- ``turn k``: turn k of one conversation, each turn adding a ~600-character answer and
  question to the history (earlier turns come from the segment cache);

Columns: tokenize (render + encode), hash (own chained hashes, 16-token blocks), and a whole
``PrefixSource.lookup`` plus ``prefix_match`` on 100 servers with events (each holding the
prompt's first half). Tokenizer: the tiny model's (run/models/tiny-llama, built by
devstack/tiny_model.py; a byte-level BPE with 512 tokens, ~2 characters per token: MORE work per
character than a real 32K-128K vocabulary), else the same kind trained here. Memory: tracemalloc
of one server's index filled through ``BlockStored`` events.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
from common import markdown_table, write_results  # noqa: E402

from extproc.kv_events import Batch, BlockStored  # noqa: E402
from extproc.kv_index import KvIndex, ServerBlocks, chain_hashes, root_hash  # noqa: E402
from extproc.kv_prefix import PrefixSource  # noqa: E402
from extproc.openai_request import ParsedRequest, parse_request  # noqa: E402
from extproc.prefix_index import PrefixIndex  # noqa: E402
from extproc.tokenizer import HfTokenizer, SimTokenizer, Tokenizer, Tokenizers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "run" / "models" / "tiny-llama"
CORPUS = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md")))


def text_at(offset: int, chars: int) -> str:
    offset %= max(1, len(CORPUS) - chars)
    return CORPUS[offset : offset + chars]


def tokenizer_folder() -> tuple[Path, str]:
    if (TINY / "tokenizer.json").is_file():
        return TINY, "run/models/tiny-llama (byte-level BPE, vocab 512)"
    from tokenizers import Tokenizer as Rust
    from tokenizers import models, pre_tokenizers, trainers

    folder = Path(tempfile.mkdtemp(prefix="bench-tok-"))
    tok = Rust(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text_at(i * 5000, 5000) for i in range(10)], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return folder, "trained here (byte-level BPE, vocab 512)"


def cpu_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        gc.disable()
        try:
            t0 = time.process_time()
            for _ in range(number):
                fn()
            runs.append((time.process_time() - t0) / number * 1e6)
        finally:
            gc.enable()
    return statistics.median(runs)


def parsed(messages: list[dict[str, str]]) -> ParsedRequest:
    return parse_request(
        "/v1/chat/completions",
        orjson.dumps({"model": "m", "messages": messages}),
        max_bytes=1 << 24,
    )


def unique(chars: int) -> Iterator[ParsedRequest]:
    i = 0
    while True:
        i += 1
        yield parsed([{"role": "user", "content": text_at(i * 7919, chars)}])


def shared(system_chars: int) -> Iterator[ParsedRequest]:
    system = text_at(0, system_chars)
    i = 0
    while True:
        i += 1
        yield parsed(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": text_at(50_000 + i * 613, 300)},
            ]
        )


def conversation(turn: int) -> Iterator[ParsedRequest]:
    """Turn ``turn`` of a conversation; successive calls are distinct conversations whose
    earlier turns were sent before (each generator call warms its own history first)."""
    i = 0
    while True:
        i += 1
        history: list[dict[str, str]] = []
        for t in range(turn):
            history.append({"role": "user", "content": text_at(i * 104_729 + t * 1_200, 300)})
            if t < turn - 1:
                history.append(
                    {"role": "assistant", "content": text_at(i * 104_729 + t * 1_200 + 300, 300)}
                )
        yield parsed(history)


def case(
    name: str,
    gen: Callable[[], Iterator[ParsedRequest]],
    tok: Tokenizer,
    tok_name: str,
    max_chars: int,
    repeats: int,
    number: int,
    warm: Callable[[Tokenizers, ParsedRequest], None] | None = None,
) -> dict[str, Any]:
    toks = Tokenizers({"m": tok}, max_chars=max_chars)
    requests = gen()
    timed = [next(requests) for _ in range(number * repeats)]
    whole = [next(requests) for _ in range(number * repeats)]
    if warm is not None:  # untimed: what earlier requests left in the caches
        for p in timed + whole:
            warm(toks, p)
    it = iter(timed)
    t_tok = cpu_us(
        lambda: toks.tokenize("m", messages=(p := next(it)).messages, key_text=p.prompt),
        number,
        repeats,
    )
    p0 = timed[0]
    tokens = toks.tokenize("m", messages=p0.messages, key_text=p0.prompt)[0].tokens  # type: ignore[union-attr]
    t_hash = cpu_us(lambda: chain_hashes(tokens, 16, root_hash(None)), number, repeats)
    kv = KvIndex(max_blocks=1_000_000)
    half = list(tokens[: len(tokens) // 32 * 16])
    for k in range(100):
        server = kv.add(f"10.0.0.{k}:8000")
        n = len(half) // 16
        server.on_batch(
            Batch(
                0,
                0.0,
                [
                    BlockStored(
                        block_hashes=list(range(n)),
                        parent_block_hash=None,
                        token_ids=half[: n * 16],
                        block_size=16,
                    )
                ],
            )
        )
    source = PrefixSource(PrefixIndex(), kv=kv, tokenizers=toks)
    endpoints = list(kv.servers)
    it2 = iter(whole)

    def request() -> None:
        prefix = source.lookup(next(it2))
        for ep in endpoints:
            prefix.match(ep)

    t_all = cpu_us(request, number, repeats)
    return {
        "tokenizer": tok_name,
        "case": name,
        "prompt_chars": len(p0.prompt),
        "tokens": len(tokens),
        "tokenize_us": t_tok,
        "hash_us": t_hash,
        "request_100_servers_us": t_all,
    }


def warm_history(toks: Tokenizers, p: ParsedRequest) -> None:
    """The conversation's earlier turns, as the gateway saw them before this one."""
    messages = p.messages or []
    for end in range(1, len(messages) - 1, 2):
        prev = messages[:end]
        toks.tokenize("m", messages=prev, key_text=orjson.dumps(prev).decode())


def bench_cases(
    tok_name: str, tok: Tokenizer, max_chars: int, repeats: int
) -> list[dict[str, Any]]:
    rows = []
    for chars in (1_000, 4_000, 8_000, 32_000):
        rows.append(
            case(
                f"unique {chars:,}",
                lambda c=chars: unique(c),
                tok,
                tok_name,
                max_chars,
                repeats,
                max(5, min(100, 200_000 // chars)),
            )
        )
    for system in (4_000, 16_000):
        rows.append(
            case(
                f"shared {system:,} + question",
                lambda s=system: shared(s),
                tok,
                tok_name,
                max_chars,
                repeats,
                50,
            )
        )
    for turn in (5, 10):
        rows.append(
            case(
                f"turn {turn} (history cached)",
                lambda t=turn: conversation(t),
                tok,
                tok_name,
                max_chars,
                repeats,
                20,
                warm=warm_history,
            )
        )
    return rows


def fill(server: ServerBlocks, blocks: int, block_size: int = 16) -> None:
    """``blocks`` distinct blocks through BlockStored events of 32 blocks each (one request's prompt)."""
    per_event = 32
    for seq, first in enumerate(range(0, blocks, per_event)):
        tokens = [(first * block_size + k) % 100_000 for k in range(per_event * block_size)]
        hashes = [(first + k).to_bytes(32, "big") for k in range(per_event)]
        server.on_batch(
            Batch(
                seq,
                0.0,
                [
                    BlockStored(
                        block_hashes=hashes,
                        parent_block_hash=None,
                        token_ids=tokens,
                        block_size=block_size,
                    )
                ],
            )
        )


def bench_memory(blocks: int) -> dict[str, Any]:
    t0 = time.process_time()
    fill(
        ServerBlocks(max_blocks=blocks), blocks
    )  # timed without tracemalloc (it slows allocations)
    cpu = time.process_time() - t0
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    server = ServerBlocks(max_blocks=blocks)
    fill(server, blocks)
    snap = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(s.size_diff for s in snap.compare_to(base, "filename"))
    return {
        "blocks": len(server),
        "bytes": used,
        "bytes_per_1000_blocks": used / len(server) * 1000,
        "apply_us_per_block": cpu / len(server) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--max-chars", type=int, default=8192, help="the service's --tokenize-max-chars"
    )
    args = ap.parse_args()
    folder, origin = tokenizer_folder()
    hf = HfTokenizer.load(str(folder))
    rows = bench_cases("hf", hf, args.max_chars, args.repeats)
    rows += bench_cases("vllmsim", SimTokenizer(), args.max_chars, args.repeats)
    memory = bench_memory(100_000)
    data = {
        "tokenizer": origin,
        "segment_cache": hf.segmented,
        "max_chars": args.max_chars,
        "rows": rows,
        "memory": memory,
    }
    table = markdown_table(
        [
            "tokenizer",
            "request",
            "prompt chars",
            "tokens",
            "tokenize µs",
            "hash µs",
            "whole request, 100 servers µs",
        ],
        [
            [
                r["tokenizer"],
                r["case"],
                f"{r['prompt_chars']:,}",
                f"{r['tokens']:,}",
                f"{r['tokenize_us']:.0f}",
                f"{r['hash_us']:.0f}",
                f"{r['request_100_servers_us']:.0f}",
            ]
            for r in rows
        ],
        "llrrrrr",
    )
    md = (
        "# Exact prefix index: tokenizing cost per request, memory per server\n\n"
        f"CPU µs per request (median of {args.repeats}), chat requests cut from the repository's docs. "
        f"--tokenize-max-chars {args.max_chars:,}: at most that much NEW text is tokenized per request "
        "(`unique 32,000` is cut there: its tokens column is what was tokenized); chat segments (text "
        "between special tokens: messages) seen before come from a cache. `hf`: "
        f"{origin}, segment cache {'on' if hf.segmented else 'off'} (more tokens per character than a "
        "real vocabulary: an upper bound for the encode); `vllmsim`: the simulator's deterministic "
        "tokenizer (`--tokenizer MODEL=vllmsim`, no segment cache). 'whole request' = approximate "
        "hashes + tokenizing + block hashes + prefix_match on 100 servers that each hold half of the "
        "prompt. `turn k`: the conversation's earlier turns passed "
        "through the gateway before (their segments are cached).\n\n"
        + table
        + f"\nIndex memory: {memory['blocks']:,} blocks of 16 tokens held for one server take "
        f"{memory['bytes'] / 1e6:.1f} MB, i.e. **{memory['bytes_per_1000_blocks'] / 1e3:.0f} KB per 1,000 blocks** "
        f"(own hash -> vLLM hash in LRU order, plus vLLM hash -> own hash); applying BlockStored events costs "
        f"{memory['apply_us_per_block']:.1f} µs CPU per block (event decoding not included). The default cap, "
        f"--kv-events-max-blocks 100,000, bounds one server at "
        f"~{memory['bytes_per_1000_blocks'] * 100 / 1e6:.0f} MB.\n"
    )
    write_results("tokenize", data, md)
    print(md)


if __name__ == "__main__":
    main()
