"""OpenAI-style errors: a refused request gets a 4xx/5xx with {"error": {"message", "type", "param", "code"}}.

Clients written for the OpenAI API (the official SDK included) read these four fields to decide what went
wrong, so the server raises `APIError` anywhere in a request's life and one handler turns it into that body.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI error fields to report."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_value(param: str, message: str) -> APIError:
    """400 for a parameter that is present but not acceptable."""
    return APIError(400, message, param=param, code="invalid_value")


def invalid_type(param: str, expected: str, got: Any) -> APIError:
    """400 for a parameter of the wrong JSON type, worded like OpenAI's own message."""
    return APIError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {json_type_name(got)} instead.",
        param=param,
        code="invalid_type",
    )


def json_type_name(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
