"""Fast parsing and validation of OpenAI request bodies (orjson).

Only what routing needs is extracted: ``model``, the prompt text (``prompt`` or
``messages``), ``stream``, ``user``, ``max_tokens``. Anything malformed becomes a
:class:`RequestError` carrying the status and OpenAI error fields, so the service answers
it directly and the request never reaches a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
LLM_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH})


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    model: str
    prompt: str  # the text whose prefix a server may have cached
    stream: bool = False
    user: str | None = None
    max_tokens: int | None = None
    # For the exact prefix index (extproc/tokenizer.py): what the server's tokenizer sees.
    messages: list[Any] | None = None  # chat: the messages as sent
    prompt_ids: list[int] | None = None  # completions: a prompt given as token ids
    template_options: dict[str, Any] | None = (
        None  # chat: chat_template_kwargs, add_generation_prompt
    )


@dataclass(frozen=True, slots=True)
class RequestError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None


def route_path(path: str) -> str:
    """``/v1/chat/completions?x=1`` -> ``/v1/chat/completions``."""
    q = path.find("?")
    return path if q < 0 else path[:q]


def _bad(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, code=code, param=param)


def _message_text(messages: object) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of message objects.", "messages")
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"'messages[{i}]' must be an object.", f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str):
            raise _bad(f"'messages[{i}].role' must be a string.", f"messages[{i}].role")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):  # content parts: keep the text ones
            text = "".join(
                p.get("text", "")
                for p in content
                if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        elif content is None:
            text = ""
        else:
            raise _bad(
                f"'messages[{i}].content' must be a string or an array.", f"messages[{i}].content"
            )
        # Role markers keep "user: ab" and "system: ab" apart, like a chat template would.
        parts.append(f"<|{role}|>{text}")
    return "\n".join(parts)


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)  # type: ignore[arg-type]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt))  # token ids: their text form still shares prefixes
    raise _bad("'prompt' must be a string, an array of strings or an array of token ids.", "prompt")


def parse_request(path: str, body: bytes, *, max_bytes: int) -> ParsedRequest:
    if len(body) > max_bytes:
        raise RequestError(
            413,
            f"Request body is {len(body)} bytes; the limit is {max_bytes}.",
            code="request_too_large",
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad("Request body must be a JSON object.", code="invalid_json")
    model = data.get("model")
    if model is None:
        raise _bad("You must provide a model parameter.", "model", "missing_model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model")
    messages = prompt_ids = options = None
    if path == CHAT_PATH:
        messages = data.get("messages")
        prompt = _message_text(messages)
        options = _template_options(data)
    else:
        if "prompt" not in data:
            raise _bad("You must provide a prompt parameter.", "prompt")
        raw = data["prompt"]
        prompt = _prompt_text(raw)
        if isinstance(raw, list) and raw and isinstance(raw[0], int):
            prompt_ids = raw
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean.", "stream")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string.", "user")
    max_tokens = data.get("max_tokens", data.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0
    ):
        raise _bad("'max_tokens' must be a non-negative integer.", "max_tokens")
    return ParsedRequest(
        model=model,
        prompt=prompt,
        stream=stream,
        user=user,
        max_tokens=max_tokens,
        messages=messages,
        prompt_ids=prompt_ids,
        template_options=options,
    )


def _template_options(data: dict[str, Any]) -> dict[str, Any] | None:
    kwargs = data.get("chat_template_kwargs")
    options = dict(kwargs) if isinstance(kwargs, dict) else {}
    if isinstance(data.get("add_generation_prompt"), bool):
        options["add_generation_prompt"] = data["add_generation_prompt"]
    return options or None
