"""Prompt tokenization for the exact prefix index: tokenizer.json + chat template (light path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from extproc.tokenizer import (
    HfTokenizer,
    SimTokenizer,
    TokenizerError,
    Tokenizers,
    load_tokenizers,
    parse_tokenizer_specs,
)
from vllmsim import tokenizer as sim_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "<|system|> <|user|> <|assistant|> please answer briefly.",
]


def build_tokenizer(folder: Path, *, bos_post_processor: bool = False) -> Tokenizer:
    """A byte-level BPE like devstack/tiny_model.py builds (no transformers needed)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    build_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def test_chat_is_the_rendered_template_without_added_special_tokens(model_dir: Path):
    tok = HfTokenizer.load(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Hello world"},
    ]
    want = raw.encode(
        "<s><|system|>\nbe brief</s>\n<|user|>\nHello world</s>\n<|assistant|>\n",
        add_special_tokens=False,
    ).ids
    assert list(tok.chat(messages, {}, 10_000)) == want
    no_gen = tok.chat(messages, {"add_generation_prompt": False}, 10_000)
    assert list(no_gen) == want[: len(no_gen)] and len(no_gen) < len(want)
    # content parts are joined with newlines (vLLM's "string" content format)
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url"},
                {"type": "text", "text": "b"},
            ],
        }
    ]
    assert (
        list(tok.chat(parts, {}, 10_000))
        == raw.encode("<s><|user|>\na\nb</s>\n<|assistant|>\n", add_special_tokens=False).ids
    )


def test_completion_adds_special_tokens_like_the_post_processor(tmp_path: Path):
    folder = tmp_path / "bos"
    raw = build_tokenizer(folder, bos_post_processor=True)
    # chat template inside tokenizer_config.json, as a list of named templates; AddedToken dicts
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "lstrip": False},
                "eos_token": "</s>",
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": TEMPLATE},
                ],
            }
        )
    )
    tok = HfTokenizer.load(str(folder / "tokenizer.json"))
    assert list(tok.completion("Hello world", 10_000)) == raw.encode("Hello world").ids
    assert tok.completion("Hello world", 10_000)[0] == 1  # the BOS
    assert list(tok.chat([{"role": "user", "content": "hi"}], {}, 10_000))[:1] == [1]


def test_long_prompts_are_cut_and_the_tokens_at_the_cut_dropped(model_dir: Path):
    tok = HfTokenizer.load(str(model_dir))
    text = "The quick brown fox jumps over the lazy dog. " * 40  # 1,800 characters
    full = list(tok.completion(text, 100_000))
    cut = list(tok.completion(text, 1000))
    assert 0 < len(cut) < len(full)
    assert cut == full[: len(cut)]  # a true prefix of the whole prompt's tokens


def test_template_errors_and_missing_templates(model_dir: Path, tmp_path: Path):
    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    tok = HfTokenizer.load(str(model_dir))
    with pytest.raises(Exception, match="roles must alternate"):
        tok.chat([{"role": "user", "content": "x"}], {}, 100)
    bare = tmp_path / "bare"
    build_tokenizer(bare)
    no_template = HfTokenizer.load(str(bare))
    with pytest.raises(ValueError, match="no chat template"):
        no_template.chat([{"role": "user", "content": "x"}], {}, 100)
    assert len(no_template.completion("Hello", 100)) > 0


def test_template_helpers_match_transformers_sandbox(model_dir: Path):
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m | tojson }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = HfTokenizer.load(str(model_dir))
    ids = tok.chat(
        [{"role": "user", "content": "é"}, {"role": "user", "content": "second"}], {}, 1000
    )
    text = Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(list(ids))
    assert text == '{"role": "user", "content": "é"}4'


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing", "no such file"),
        (lambda d: (d / "t.json").write_text("{bad") and d / "t.json", "cannot read"),
    ],
)
def test_load_errors_are_config_errors(tmp_path: Path, setup, message):
    with pytest.raises(TokenizerError, match=message):
        HfTokenizer.load(str(setup(tmp_path)))


def test_bad_tokenizer_config_and_template(model_dir: Path):
    (model_dir / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TokenizerError, match="does not compile"):
        HfTokenizer.load(str(model_dir))
    (model_dir / "chat_template.jinja").unlink()
    (model_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        HfTokenizer.load(str(model_dir))


def test_hub_names_go_through_the_hub_and_fail_readably_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerError, match="hub download failed"):
        HfTokenizer.load("some-org/some-model-that-is-not-cached")


def test_sim_tokenizer_is_the_simulators_own():
    tok = SimTokenizer()
    msgs = [{"role": "user", "content": "Hello there"}]
    assert list(tok.chat(msgs, {}, 10_000)) == sim_tokenizer.encode(sim_tokenizer.render_chat(msgs))
    assert list(tok.completion("Hello there", 10_000)) == sim_tokenizer.encode_completion_prompt(
        "Hello there"
    )


def test_specs_parse_and_load(model_dir: Path):
    assert parse_tokenizer_specs(["m=/x", " * = vllmsim "]) == {"m": "/x", "*": "vllmsim"}
    for bad in (["m"], ["=x"], ["m="], ["m=a", "m=b"]):
        with pytest.raises(ValueError):
            parse_tokenizer_specs(bad)
    toks = load_tokenizers([f"a={model_dir}", f"b={model_dir}", "*=vllmsim"], max_chars=100)
    assert toks.for_model("a") is toks.for_model("b")  # one load per spec
    assert isinstance(toks.for_model("anything"), SimTokenizer)
    assert toks.max_chars == 100


def test_tokenizers_cache_fallback_and_errors(model_dir: Path):
    tok = HfTokenizer.load(str(model_dir))
    toks = Tokenizers({"m": tok}, max_chars=1000, cache_tokens=60)
    msgs = [{"role": "user", "content": "Hello world"}]
    assert toks.tokenize("other", messages=msgs, key_text="x") == (None, "no-tokenizer")
    first, result = toks.tokenize("m", messages=msgs, key_text="<|user|>Hello world")
    assert result == "ok" and first is not None and len(first.tokens) > 0
    again, result = toks.tokenize("m", messages=msgs, key_text="<|user|>Hello world")
    assert result == "cached" and again is first
    ids, result = toks.tokenize("m", prompt_ids=[5, 6, 2**40 + 7], key_text="5 6 x")
    assert result == "ok" and list(ids.tokens) == [5, 6, 7]  # masked like vLLM's own int range
    text, result = toks.tokenize("m", prompt="Hello world", key_text="Hello world")
    assert result == "ok" and list(text.tokens) == list(tok.completion("Hello world", 1000))
    # the cache is bounded in tokens: old prompts leave
    for i in range(20):
        toks.tokenize("m", prompt=f"prompt number {i} " * 3, key_text=f"p{i}")
    assert sum(len(p.tokens) for p in toks._cache.values()) <= 60
    assert toks.tokenize("m", messages=msgs, key_text="<|user|>Hello world")[1] == "ok"  # evicted
    (model_dir / "chat_template.jinja").write_text("{{ raise_exception('no') }}")
    failing = Tokenizers({"*": HfTokenizer.load(str(model_dir))})
    for i in range(12):
        assert failing.tokenize("m", messages=msgs, key_text=f"k{i}") == (None, "error")
    assert failing.failures == 12


def test_chat_segments_are_cached_and_exact(model_dir: Path):
    tok = HfTokenizer.load(str(model_dir))
    assert tok.segmented  # the self-check passed for a byte-level BPE
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    system = "The quick brown fox jumps over the lazy dog. " * 20  # 900 characters: cached
    conv = [{"role": "system", "content": system}, {"role": "user", "content": "Hello world"}]
    text = tok._render(conv, {})
    assert list(tok.chat(conv, {}, 10_000)) == raw.encode(text, add_special_tokens=False).ids
    hits = tok.segment_hits
    longer = conv + [
        {"role": "assistant", "content": "fine " * 60},
        {"role": "user", "content": "and you?"},
    ]
    ids = tok.chat(longer, {}, 10_000)
    assert tok.segment_hits > hits  # the system prompt was not tokenized again
    assert list(ids) == raw.encode(tok._render(longer, {}), add_special_tokens=False).ids
    # the budget counts new text only: the cached system prompt is free, the rest is cut
    fresh = conv + [
        {"role": "assistant", "content": "A novel answer nobody gave before. " * 30},
        {"role": "user", "content": "more?"},
    ]
    whole = raw.encode(tok._render(fresh, {}), add_special_tokens=False).ids
    cut = tok.chat(fresh, {}, 0)
    assert len(ids_of_conv := tok.chat(conv, {}, 0)) > 0
    assert len(ids_of_conv) < len(cut) < len(whole) and list(cut) == whole[: len(cut)]


def test_segment_cache_is_off_when_segments_would_differ(tmp_path: Path):
    """Metaspace with prepend_scheme "first" marks only the text's start: encoding the text
    between special tokens alone would differ, and the load-time check notices."""
    folder = tmp_path / "spm"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS,
        trainer=trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        ),
    )
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    loaded = HfTokenizer.load(str(folder))
    assert not loaded.segmented
    conv = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "how are you"},
    ]
    assert (
        list(loaded.chat(conv, {}, 10_000))
        == tok.encode(loaded._render(conv, {}), add_special_tokens=False).ids
    )


def test_a_long_segment_cut_by_the_budget_is_cached_and_grows(model_dir: Path):
    tok = HfTokenizer.load(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    system = "The quick brown fox jumps over the lazy dog. " * 100  # 4,500 characters
    conv = [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
    full = raw.encode(tok._render(conv, {}), add_special_tokens=False).ids
    first = list(tok.chat(conv, {}, 1000))
    assert first == full[: len(first)] and len(first) < len(full)
    hits = tok.segment_hits
    assert (
        list(tok.chat(conv, {}, 1000)) == first and tok.segment_hits == hits + 1
    )  # the cut is cached
    longer = list(tok.chat(conv, {}, 3000))  # a larger budget re-encodes further
    assert longer == full[: len(longer)] and len(longer) > len(first)
    assert list(tok.chat(conv, {}, 10_000)) == full
