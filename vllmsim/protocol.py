"""Request validation and response bodies of vLLM's OpenAI-compatible server."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from . import tokenizer
from .errors import ApiError


@dataclass
class ParsedRequest:
    chat: bool
    model: str  # name echoed back (base model or adapter)
    lora: str | None
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool


def parse_body(raw: bytes, schema: str) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # FastAPI/pydantic wording as vLLM reports it
        raise ApiError(
            400,
            f"[{{'type': 'json_invalid', 'loc': ('body', {exc.pos}), "
            f"'msg': 'JSON decode error', "
            f"'ctx': {{'error': '{exc.msg}'}}}}]",
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            400,
            f"1 validation error for {schema}\n  Input should be a valid "
            f"dictionary or object to extract fields from",
        )
    return body


def _missing(schema: str, field: str) -> ApiError:
    return ApiError(400, f"1 validation error for {schema}\n{field}\n  Field required", field)


def _bad(schema: str, field: str, what: str) -> ApiError:
    return ApiError(400, f"1 validation error for {schema}\n{field}\n  {what}", field)


def _opt_bool(body: dict[str, Any], schema: str, field: str) -> bool:
    v = body.get(field)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(schema, field, "Input should be a valid boolean")
    return v


def _opt_int(body: dict[str, Any], schema: str, field: str) -> int | None:
    v = body.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(schema, field, "Input should be a valid integer")
    return v


def resolve_model(
    body: dict[str, Any], base: str, loras: tuple[str, ...]
) -> tuple[str, str | None]:
    model = body.get("model")
    if model is None:
        return base, None  # vLLM serves the (first) base model when "model" is omitted
    if not isinstance(model, str):
        raise ApiError(400, "1 validation error\nmodel\n  Input should be a valid string", "model")
    if model == base:
        return model, None
    if model in loras:
        return model, model
    raise ApiError(404, f"The model `{model}` does not exist.", "model")


def _prompt_ids(body: dict[str, Any]) -> list[int]:
    schema = "CompletionRequest"
    if "prompt" not in body or body["prompt"] is None:
        raise _missing(schema, "prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return tokenizer.encode_completion_prompt(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [t & 0x7FFFFFFF for t in p]  # token ids are taken as they are
    if isinstance(p, list) and len(p) > 1:
        raise ApiError(
            400,
            "vllmsim supports one prompt per request (batched prompts are not simulated)",
            "prompt",
        )
    raise _bad(schema, "prompt", "Input should be a valid string or a list of token ids")


def _chat_prompt_ids(body: dict[str, Any]) -> list[int]:
    schema = "ChatCompletionRequest"
    msgs = body.get("messages")
    if msgs is None:
        raise _missing(schema, "messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise _bad(schema, "messages", "Input should be a valid list of message objects")
    try:
        text = tokenizer.render_chat(
            msgs, add_generation_prompt=body.get("add_generation_prompt", True) is not False
        )
    except TypeError as exc:
        raise _bad(schema, "messages", str(exc)) from None
    return tokenizer.encode(text)


def parse_request(
    body: dict[str, Any], chat: bool, base_model: str, loras: tuple[str, ...], max_model_len: int
) -> ParsedRequest:
    schema = "ChatCompletionRequest" if chat else "CompletionRequest"
    prompt_ids = _chat_prompt_ids(body) if chat else _prompt_ids(body)
    stream = _opt_bool(body, schema, "stream")
    ignore_eos = _opt_bool(body, schema, "ignore_eos")
    n = _opt_int(body, schema, "n")
    max_tokens = _opt_int(body, schema, "max_tokens")
    if chat:
        mct = _opt_int(body, schema, "max_completion_tokens")
        if mct is not None:
            max_tokens = mct
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not stream:
            raise ApiError(
                400, "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        if not isinstance(so, dict):
            raise _bad(schema, "stream_options", "Input should be a valid dictionary")
        include_usage = bool(so.get("include_usage"))
    model, lora = resolve_model(body, base_model, loras)
    if n is not None and n != 1:
        raise ApiError(400, "vllmsim only simulates n=1", "n")
    plen = len(prompt_ids)
    if plen >= max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, your request has {plen} input tokens. Please reduce the "
            f"length of the input messages.",
            "messages" if chat else "prompt",
        )
    if max_tokens is None:
        max_tokens = max_model_len - plen
    elif max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    elif plen + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. "
            f"This model's maximum context length is {max_model_len} tokens and "
            f"your request has {plen} input tokens ({max_tokens} > {max_model_len}"
            f" - {plen}).",
            "max_tokens",
        )
    return ParsedRequest(
        chat, model, lora, prompt_ids, max_tokens, ignore_eos, stream, include_usage
    )


# ---- response bodies --------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def completion_body(rid: str, model: str, text: str, finish: str, p: int, c: int) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(p, c),
            "kv_transfer_params": None,
        }
    )


def chat_body(rid: str, model: str, text: str, finish: str, p: int, c: int) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(p, c),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    )


class StreamFormatter:
    """Pre-rendered SSE chunk framing, so a token costs one orjson.dumps of its text."""

    def __init__(self, rid: str, model: str, chat: bool) -> None:
        created = int(time.time())
        head = orjson.dumps(
            {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
            }
        )[:-1]
        self._head = b"data: " + head
        self.chat = chat
        if chat:
            self._pre = self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._mid = b'},"logprobs":null,"finish_reason":'
            self._post = b"}]}\n\n"
        else:
            self._pre = self._head + b',"choices":[{"index":0,"text":'
            self._mid = b',"logprobs":null,"finish_reason":'
            self._post = b',"stop_reason":null}]}\n\n'

    def role_chunk(self) -> bytes:
        return (
            self._head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def text_chunk(self, text: str, finish: str | None) -> bytes:
        fin = b"null" if finish is None else b'"' + finish.encode() + b'"'
        if self.chat and finish is not None:
            return self._pre + orjson.dumps(text) + self._mid + fin + b',"stop_reason":null}]}\n\n'
        return self._pre + orjson.dumps(text) + self._mid + fin + self._post

    def usage_chunk(self, p: int, c: int) -> bytes:
        return self._head + b',"choices":[],"usage":' + orjson.dumps(usage(p, c)) + b"}\n\n"

    DONE = b"data: [DONE]\n\n"
