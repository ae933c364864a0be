"""Prompt -> the token ids a vLLM server computes for it (for the exact prefix index).

For a chat request vLLM renders the model's chat template and tokenizes the result without
adding special tokens (the template has them); for a completion it tokenizes the prompt with
them (a BOS when the tokenizer's post-processor adds one); token-id prompts are taken as they
are. KV events carry exactly those ids, so the service must do the same.

Light path on purpose: the HF ``tokenizers`` library (the Rust tokenizer behind
transformers' fast tokenizers, ~10 MB) reads ``tokenizer.json``; ``jinja2`` renders the chat
template from ``chat_template.jinja`` or ``tokenizer_config.json`` in a sandbox configured like
transformers' ``apply_chat_template`` (trim_blocks, lstrip_blocks, loop controls, ``tojson``,
``raise_exception``, ``strftime_now``; special tokens as variables). ``transformers`` would
pull in hundreds of MB and seconds of import for the same result.

Cost: a ``tokenizers`` encode takes ~0.3-0.6 µs per character here (bench/bench_tokenize.py),
i.e. milliseconds for a long prompt, on the event loop. Two things keep that off the common path:
chat prompts are split at the tokenizer's special tokens (message boundaries in every chat
template: tokenizers never merges across an added token) and each long segment's ids are cached,
so a shared system prompt or a conversation's earlier turns are tokenized once; and at most
``--tokenize-max-chars`` characters of *new* text are tokenized per request (the prompt is matched
up to there). Segment caching is switched on only if, at load, segment-wise encoding equals
whole-text encoding on sample conversations rendered with the model's template.

``--tokenizer MODEL=SPEC``; SPEC is a folder with ``tokenizer.json`` (a model folder), a
``tokenizer.json`` file, a Hugging Face hub name (downloaded through ``huggingface_hub``'s cache;
offline with ``HF_HUB_OFFLINE=1``), or ``vllmsim`` (the simulator's own deterministic
tokenizer, see docs/vllmsim.md). MODEL ``*`` applies to every model without its own entry.

Known differences from vLLM: content parts are joined with newlines (vLLM's "string" content
format; templates that iterate over parts would differ), ``chat_template_kwargs`` and
``add_generation_prompt`` are taken from the request, tools are not passed to the template.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import xxhash

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """A ``--tokenizer`` that cannot be loaded (the service turns it into a start-up error)."""


SIM_SPEC = "vllmsim"
ANY_MODEL = "*"
# Tokens whose text ends within this many characters of a truncation point may differ from
# the full prompt's tokenization (a BPE merge across the cut): they are dropped.
_CUT_MARGIN_CHARS = 64
_TOKEN_MASK = 0x7FFFFFFF
MAX_PROMPT_TOKENS = 65_536  # cached segments are free, but a prompt's ids stay bounded
_MIN_CACHED_SEGMENT = 256  # shorter segments are cheaper to encode than to cache
_SEGMENT_CACHE_TOKENS = 1_000_000
_SELF_CHECK_MESSAGES = (
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello there, how are you today?"},
        {"role": "assistant", "content": " I am fine.\n\nThanks for asking!"},
        {
            "role": "user",
            "content": "  Leading spaces,\ttabs; unicode: é 中文 🙂 and 12345 digits.",
        },
    ],
    [
        {"role": "user", "content": "A question"},
        {"role": "assistant", "content": "An answer"},
        {"role": "user", "content": "\nA follow-up\n"},
    ],
)


class Tokenizer(Protocol):
    def chat(
        self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any], max_chars: int
    ) -> array: ...

    def completion(self, prompt: str, max_chars: int) -> array: ...


def _tokens(ids: Sequence[int]) -> array:
    return array("I", ids)


class HfTokenizer:
    """``tokenizers.Tokenizer`` + the model's chat template."""

    def __init__(
        self, tokenizer: Any, template: str | None, special: Mapping[str, str], name: str
    ) -> None:
        self.tokenizer = tokenizer
        self.special = dict(special)
        self.name = name
        self.template = _compile_template(template) if template else None
        self._split_re, self._added_ids = _added_token_splitter(tokenizer)
        # segment hash -> (ids, characters covered): a segment cut by the budget keeps its start
        self._segments: OrderedDict[bytes, tuple[array, int]] = OrderedDict()
        self._segment_tokens = 0
        self.segment_hits = 0
        self.segmented = (
            self._split_re is not None and self.template is not None and self._self_check()
        )

    @classmethod
    def load(cls, spec: str) -> HfTokenizer:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as exc:  # pragma: no cover - a dependency of the service
            raise TokenizerError(f"--tokenizer needs the 'tokenizers' package: {exc}") from None
        path = Path(spec).expanduser()
        folder: Path | None
        if path.is_dir():
            folder, file = path, path / "tokenizer.json"
        elif path.is_file():
            folder, file = path.parent, path
        elif _looks_like_path(spec):
            raise TokenizerError(f"--tokenizer {spec}: no such file or folder")
        else:
            folder, file = _from_hub(spec)
        try:
            tok = RustTokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a bad file
            raise TokenizerError(f"--tokenizer {spec}: cannot read {file}: {exc}") from None
        config = _read_json(folder / "tokenizer_config.json") if folder else {}
        template = _chat_template(folder, config)
        special = {
            k: v
            for k, v in ((k, _token_text(config.get(k))) for k in _SPECIAL_KEYS)
            if v is not None
        }
        return cls(tok, template, special, spec)

    def chat(
        self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any], max_chars: int
    ) -> array:
        if self.template is None:
            raise ValueError(f"tokenizer {self.name} has no chat template")
        kwargs = {k: v for k, v in options.items() if k not in ("messages",)}
        text = self._render(messages, kwargs)
        if self.segmented:
            return self._encode_segments(text, max_chars)
        return self._encode(text, add_special_tokens=False, max_chars=max_chars)

    def _render(self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> str:
        assert self.template is not None
        return str(
            self.template.render(
                messages=[_string_content(m) for m in messages],
                **{**self.special, "add_generation_prompt": True, **options},
            )
        )

    def _encode_segments(self, text: str, budget: int) -> array:
        """Special tokens as their ids, the text between them from the segment cache or encoded
        (spending ``budget`` characters; the segment that exhausts it is cut and ends the prompt)."""
        assert self._split_re is not None
        out = array("I")
        cache = self._segments
        for piece in self._split_re.split(text):
            if not piece:
                continue
            added = self._added_ids.get(piece)
            if added is not None:
                out.append(added)
                continue
            key = (
                xxhash.xxh3_128_digest(piece.encode("utf-8", "surrogatepass"))
                if len(piece) >= _MIN_CACHED_SEGMENT
                else None
            )
            hit = cache.get(key) if key is not None else None
            if hit is not None and (hit[1] == len(piece) or budget < hit[1] + _MIN_CACHED_SEGMENT):
                cache.move_to_end(key)  # type: ignore[arg-type]
                self.segment_hits += 1
                ids, covered = hit
            elif len(piece) <= budget:
                budget -= len(piece)
                ids, covered = (
                    _tokens(self.tokenizer.encode(piece, add_special_tokens=False).ids),
                    len(piece),
                )
                if key is not None:
                    self._remember(key, ids, covered)
            else:  # over the budget: the start of the segment, and the prompt ends there
                covered = max(budget, _MIN_CACHED_SEGMENT)
                budget = 0
                ids = self._encode(piece, add_special_tokens=False, max_chars=covered)
                if key is not None:
                    self._remember(key, ids, covered)
            out.extend(ids)
            if covered < len(piece) or len(out) >= MAX_PROMPT_TOKENS:
                break
        del out[MAX_PROMPT_TOKENS:]
        return out

    def _remember(self, key: bytes, ids: array, covered: int) -> None:
        previous = self._segments.pop(key, None)
        if previous is not None:  # a longer cut of the same segment replaces the shorter one
            self._segment_tokens -= len(previous[0])
        self._segments[key] = (ids, covered)
        self._segment_tokens += len(ids)
        while self._segment_tokens > _SEGMENT_CACHE_TOKENS:
            _, (old, _covered) = self._segments.popitem(last=False)
            self._segment_tokens -= len(old)

    def _self_check(self) -> bool:
        """Segment-wise encoding must equal whole-text encoding (normalizers or pre-tokenizers
        that look across an added token would break it): else always encode the whole text."""
        samples = []
        for messages in _SELF_CHECK_MESSAGES:
            try:
                samples.append(self._render(messages, {}))
            except Exception:  # noqa: BLE001, S112 - a template refusing the sample (e.g. no system role)
                continue
        if not samples:
            return False
        for text in samples:
            whole = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if list(self._encode_segments(text, len(text))) != whole:
                log.info(
                    "tokenizer %s: segment-wise encoding differs from whole-text encoding; "
                    "segment cache off",
                    self.name,
                )
                self._segments.clear()
                self._segment_tokens = 0
                return False
        self._segments.clear()
        self._segment_tokens = 0
        return True

    def completion(self, prompt: str, max_chars: int) -> array:
        return self._encode(prompt, add_special_tokens=True, max_chars=max_chars)

    def _encode(self, text: str, *, add_special_tokens: bool, max_chars: int) -> array:
        if len(text) <= max_chars:
            return _tokens(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        enc = self.tokenizer.encode(text[:max_chars], add_special_tokens=add_special_tokens)
        keep_until = max_chars - _CUT_MARGIN_CHARS
        ids = enc.ids
        n = len(ids)
        offsets = enc.offsets
        while n and offsets[n - 1][1] > keep_until:
            n -= 1
        return _tokens(ids[:n])


class SimTokenizer:
    """vllmsim's deterministic tokenizer (``--tokenizer MODEL=vllmsim``): routes exactly onto
    simulators, which have no tokenizer file."""

    def __init__(self) -> None:
        from vllmsim import tokenizer as sim

        self._sim = sim

    def chat(
        self, messages: Sequence[Mapping[str, Any]], options: Mapping[str, Any], max_chars: int
    ) -> array:
        text = self._sim.render_chat(
            messages, add_generation_prompt=options.get("add_generation_prompt", True) is not False
        )
        return _tokens(self._sim.encode(text[:max_chars]))

    def completion(self, prompt: str, max_chars: int) -> array:
        return _tokens(self._sim.encode_completion_prompt(prompt[:max_chars]))


@dataclass(slots=True)
class PromptTokens:
    """A tokenized prompt and its chained block hashes per (block size, LoRA root)."""

    tokens: array
    hashes: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)


class Tokenizers:
    """``--tokenizer`` entries by model, plus a small LRU of recent prompts (bounded in tokens)."""

    def __init__(
        self,
        by_model: Mapping[str, Tokenizer],
        *,
        max_chars: int = 8192,
        cache_tokens: int = 2_000_000,
    ) -> None:
        self.by_model = dict(by_model)
        self.max_chars = max_chars
        self.cache_tokens = cache_tokens
        self._cache: OrderedDict[bytes, PromptTokens] = OrderedDict()
        self._cached_tokens = 0
        self.failures = 0

    def for_model(self, model: str) -> Tokenizer | None:
        return self.by_model.get(model) or self.by_model.get(ANY_MODEL)

    def tokenize(
        self,
        model: str,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        options: Mapping[str, Any] | None = None,
        key_text: str = "",
    ) -> tuple[PromptTokens | None, str]:
        """(tokens or None, result) where result is ``ok``, ``cached``, ``no-tokenizer`` or ``error``."""
        tok = self.for_model(model)
        if tok is None:
            return None, "no-tokenizer"
        kind = b"c" if messages is not None else b"p"
        key = xxhash.xxh3_128_digest(f"{model}\0{key_text}".encode("utf-8", "surrogatepass")) + kind
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit, "cached"
        try:
            if prompt_ids is not None:
                tokens = _tokens([t & _TOKEN_MASK for t in prompt_ids[: self.max_chars]])
            elif messages is not None:
                tokens = tok.chat(messages, options or {}, self.max_chars)
            else:
                tokens = tok.completion(prompt or "", self.max_chars)
        except Exception as exc:  # noqa: BLE001 - a template error, odd content: route on the approximate index
            self.failures += 1
            if self.failures <= 10 or self.failures % 1000 == 0:
                log.warning(
                    "tokenizing a %s prompt failed (%d so far): %s", model, self.failures, exc
                )
            return None, "error"
        result = PromptTokens(tokens)
        self._cache[key] = result
        self._cached_tokens += len(tokens)
        while self._cached_tokens > self.cache_tokens and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old.tokens)
        return result, "ok"


def parse_tokenizer_specs(entries: Sequence[str]) -> dict[str, str]:
    """``MODEL=SPEC`` entries -> {model: spec}; raises ValueError with a readable message."""
    out: dict[str, str] = {}
    for entry in entries:
        model, sep, spec = entry.partition("=")
        model, spec = model.strip(), spec.strip()
        if not sep or not model or not spec:
            raise ValueError(
                f"--tokenizer {entry!r}: expected MODEL=PATH_OR_NAME (MODEL '*' for every model)"
            )
        if model in out:
            raise ValueError(f"--tokenizer: model {model!r} given twice")
        out[model] = spec
    return out


def load_tokenizers(entries: Sequence[str], *, max_chars: int) -> Tokenizers:
    """Load every ``--tokenizer`` at start: a bad one stops the start (ConfigError)."""
    loaded: dict[str, Tokenizer] = {}
    by_spec: dict[str, Tokenizer] = {}
    for model, spec in parse_tokenizer_specs(entries).items():
        tok = by_spec.get(spec)
        if tok is None:
            tok = by_spec[spec] = SimTokenizer() if spec == SIM_SPEC else HfTokenizer.load(spec)
        loaded[model] = tok
        log.info("tokenizer for %s: %s", model, spec)
    return Tokenizers(loaded, max_chars=max_chars)


# -- chat templates, as transformers renders them -----------------------------------------

_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]  # an AddedToken written out as a dict
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"--tokenizer: cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _chat_template(folder: Path | None, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` (transformers >= 4.43 saves it apart), else tokenizer_config's
    ``chat_template`` (a string, or a list of named templates: the one named ``default``)."""
    if folder is not None:
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


def _added_token_splitter(tokenizer: Any) -> tuple[Any, dict[str, int]]:
    """A regex splitting text at the tokenizer's plain added tokens (no strip/word/normalize
    rules), keeping them; and their ids. (None, {}) when there are none."""
    import re

    try:
        added = tokenizer.get_added_tokens_decoder()
    except AttributeError:  # pragma: no cover - tokenizers < 0.14
        return None, {}
    ids = {
        t.content: i
        for i, t in added.items()
        if t.content and not (t.lstrip or t.rstrip or t.single_word or t.normalized)
    }
    if not ids:
        return None, {}
    pattern = "(" + "|".join(re.escape(c) for c in sorted(ids, key=len, reverse=True)) + ")"
    return re.compile(pattern), ids


def _compile_template(source: str) -> Any:
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(f"--tokenizer: the chat template does not compile: {exc}") from None


def _string_content(message: Mapping[str, Any]) -> Mapping[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        text = "\n".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
        return {**message, "content": text}
    return message


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".json")


def _from_hub(name: str) -> tuple[Path, Path]:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - installed with tokenizers
        raise TokenizerError(
            f"--tokenizer {name}: not a file or folder, and huggingface_hub is missing"
        ) from None
    try:
        file = Path(hf_hub_download(name, "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, gated model ...
        raise TokenizerError(
            f"--tokenizer {name}: not a file or folder, and the hub download failed: {exc}"
        ) from None
    for extra in ("tokenizer_config.json", "chat_template.jinja"):
        try:
            hf_hub_download(name, extra)
        except Exception:  # noqa: BLE001, S110 - optional files
            pass
    return file.parent, file
