"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import orjson


def openai_error(
    message: str, *, type_: str, code: str | int | None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
