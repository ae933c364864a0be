"""Deterministic stand-in tokenizer, identical on every instance and every run.

Why not a real tokenizer: it would pull in a model download. Routing only needs that (a) the
same text always gives the same token ids, so prefix-cache blocks line up across instances,
and (b) counts are in the right ballpark (~4 characters per English token, like BPE).

Rules (documented in docs/vllmsim.md): the text is split by ``_PIECE_RE`` into pieces:
a special token ``<|name|>``; an optional single space plus 1-6 ASCII letters; an optional
space plus 1-3 digits; an optional space plus one other non-space character; or a run of
whitespace. The id of a piece is the low 31 bits of its xxh3_64 hash. Completions get a
``<|begin_of_text|>`` BOS token, chat requests are rendered with a Llama-3 style template.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

BOS = "<|begin_of_text|>"
_PIECE_RE = re.compile(r"<\|[a-z_]+\|>| ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")
_ID_MASK = 0x7FFFFFFF
_CACHE_LIMIT = 200_000

# Filler vocabulary for generated text: every entry is a single token under the rules above,
# so re-tokenising a response (e.g. in the next chat turn) reproduces the generated ids.
FILLER_WORDS: tuple[str, ...] = (
    " the",
    " of",
    " and",
    " to",
    " in",
    " is",
    " it",
    " that",
    " for",
    " on",
    " was",
    " with",
    " as",
    " at",
    " by",
    " we",
    " be",
    " or",
    " an",
    " are",
    " not",
    " but",
    " all",
    " can",
    " one",
    " you",
    " new",
    " has",
    " its",
    " may",
    " out",
    " use",
)

_piece_ids: dict[str, int] = {}


def piece_id(piece: str) -> int:
    tid = _piece_ids.get(piece)
    if tid is None:
        if len(_piece_ids) >= _CACHE_LIMIT:  # bound memory for adversarial inputs
            _piece_ids.clear()
        tid = xxhash.xxh3_64_intdigest(piece.encode()) & _ID_MASK
        _piece_ids[piece] = tid
    return tid


def encode(text: str) -> list[int]:
    return [piece_id(p) for p in _PIECE_RE.findall(text)]


def count_tokens(text: str) -> int:
    return len(_PIECE_RE.findall(text))


def encode_completion_prompt(prompt: str) -> list[int]:
    """vLLM's Llama tokenizers prepend BOS to completion prompts."""
    return [piece_id(BOS)] + encode(prompt)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text parts carry tokens here
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    raise TypeError("message content must be a string or a list of content parts")


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """Llama-3 chat template, so a shared system prompt is a shared token prefix."""
    parts = [BOS]
    for msg in messages:
        role = msg.get("role")
        if not isinstance(role, str):
            raise TypeError("each message needs a string 'role'")
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
        parts.append(_content_text(msg.get("content")))
        parts.append("<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


FILLER_IDS: tuple[int, ...] = tuple(piece_id(w) for w in FILLER_WORDS)


def filler_offset(prompt_ids: Sequence[int], seed: int) -> int:
    """Where in the filler cycle a response starts: a function of the prompt and seed only."""
    return (block_root(seed) ^ (prompt_ids[-1] if prompt_ids else 0)) % len(FILLER_WORDS)


def filler_text(offset: int, start: int, count: int) -> str:
    n = len(FILLER_WORDS)
    return "".join(FILLER_WORDS[(offset + i) % n] for i in range(start, start + count))


def block_root(extra: int | str = 0) -> int:
    """Root of a hash chain; the extra key keeps e.g. different LoRA adapters apart (like vLLM)."""
    return xxhash.xxh3_64_intdigest(str(extra).encode())


def hash_block(parent: int, token_ids: Iterable[int]) -> int:
    """Chained block hash: a block is identified by its tokens *and* everything before it."""
    return xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + array("I", token_ids).tobytes())
