"""The one place where exceptions become HTTP responses (OpenAI's error shape)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pice.shared.errors import PiceError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error",
          422: "invalid_request_error", 503: "service_unavailable", 500: "internal_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param,
                      "code": status}}


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def _describe(err: Any) -> str:
    text = f"{_loc_to_param(tuple(err['loc']))}: {err['msg']}"
    if err.get("type") not in ("missing", "model_type") and "input" in err:
        shown = repr(err["input"])
        text += f", got {shown[:77] + '...' if len(shown) > 80 else shown}"
    return text


def exception_to_response(exc: BaseException) -> tuple[int, dict[str, object]]:
    """Status and body for any exception (used by handlers and by streams that already began)."""
    if isinstance(exc, PiceError):
        return exc.status_code, error_body(exc.status_code, exc.message, exc.field)
    log.exception("unhandled error", exc_info=exc)
    return 500, error_body(500, "internal error; see the server log")


def install_error_handlers(app: FastAPI, on_error: object = None) -> None:
    def count(status: int) -> None:
        if callable(on_error):
            on_error(status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first: dict[str, Any] = dict(errs[0]) if errs else {"loc": ("body",), "msg": "invalid"}
        param = _loc_to_param(tuple(first.get("loc", ("body",))))
        if first.get("type") == "json_invalid":
            ctx = dict(first.get("ctx") or {})
            msg = f"body is not valid JSON: {ctx.get('error', first['msg'])}"
        else:
            msg = "; ".join(_describe(e) for e in errs)
        count(400)
        return JSONResponse(error_body(400, msg, param), status_code=400)

    @app.exception_handler(PiceError)
    async def _pice(_: Request, exc: PiceError) -> JSONResponse:
        status, body = exception_to_response(exc)
        count(status)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        count(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        status, body = exception_to_response(exc)
        count(status)
        return JSONResponse(body, status_code=status)
