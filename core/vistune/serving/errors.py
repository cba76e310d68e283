"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the server makes goes through :class:`APIError`, so clients written for
the OpenAI API (the official ``openai`` package among them) report them properly.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error answer: status, message and the OpenAI error ``type``/``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: Any) -> None:
    """Answer every error (ours, the engine's, the framework's) in the OpenAI shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from vistune.errors import DataError, VistuneError
    from vistune.inference.engine import EngineClosedError, RequestError

    def text(exc: VistuneError) -> str:
        return exc.message if not exc.hint else f"{exc.message} ({exc.hint})"

    def respond(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return respond(APIError(400, text(exc), param=exc.param, code=exc.code))

    @app.exception_handler(DataError)
    async def data_error(request, exc: DataError):
        return respond(APIError(400, text(exc), param="messages", code="invalid_prompt"))

    @app.exception_handler(EngineClosedError)
    async def closed_error(request, exc: EngineClosedError):
        return respond(APIError(503, text(exc), type="service_unavailable", code="shutting_down"))

    @app.exception_handler(VistuneError)
    async def vistune_error(request, exc: VistuneError):
        return respond(APIError(400, text(exc)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return respond(APIError(400, f"invalid request: {first.get('msg', exc)}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return respond(APIError(exc.status_code, str(exc.detail), type=kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return respond(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
