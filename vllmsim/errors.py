"""vLLM-shaped error responses: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson
from aiohttp import web

_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "BadRequestError"),
            "param": param,
            "code": status,
        }
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
