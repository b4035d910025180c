"""The one place where exceptions become HTTP responses (OpenAI's error shape)."""

from __future__ import annotations

import json
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


def json_problem(exc: ValueError, doc: str | bytes | None = None) -> str:
    """What is wrong with a body that should be JSON, as a user can act on it: the undecodable
    byte, or the line and column of the syntax error."""
    if isinstance(exc, UnicodeDecodeError):
        where = (f"byte 0x{exc.object[exc.start:exc.start + 1].hex()} at offset {exc.start}"
                 if exc.encoding.replace("-", "").lower() == "utf8"
                 else f"read as {exc.encoding}, byte offset {exc.start}")
        return f"body is not UTF-8 text ({where}: {exc.reason}); send JSON encoded as UTF-8"
    if isinstance(exc, json.JSONDecodeError):
        return f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    return f"body is not valid JSON: {exc}"


def _json_at(doc: Any, pos: int, msg: str) -> str:
    """FastAPI's json_invalid error (a character offset) as line and column."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, bytes) else str(doc or "")
    line, column = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    return f"body is not valid JSON: {msg} at line {line} column {column}"


def _not_json(content_type: str | None) -> str:
    got = f"content-type {content_type!r}" if content_type else "no content-type"
    return f"expected a JSON object body with content-type: application/json ({got} was sent)"


def _is_json(content_type: str | None) -> bool:
    main = (content_type or "").split(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/")
                                          and main.endswith("+json"))


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
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first: dict[str, Any] = dict(errs[0]) if errs else {"loc": ("body",), "msg": "invalid"}
        loc = tuple(first.get("loc", ("body",)))
        param: str | None = _loc_to_param(loc)
        ctype = request.headers.get("content-type")
        if first.get("type") == "json_invalid":  # loc: ("body", character offset)
            ctx = dict(first.get("ctx") or {})
            pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
            msg, param = _json_at(exc.body, pos, str(ctx.get("error", first["msg"]))), None
        elif loc == ("body",) and not _is_json(ctype) and (
                first.get("type") == "missing" or isinstance(first.get("input"), bytes)):
            msg, param = _not_json(ctype), None  # FastAPI passed the raw bytes on
        elif loc == ("body",) and first.get("type") == "missing":
            msg, param = "body is empty: expected a JSON object", None
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
        message = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):  # body parsing
            message = json_problem(exc.__cause__)  # (FastAPI: "error parsing the body")
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        status, body = exception_to_response(exc)
        count(status)
        return JSONResponse(body, status_code=status)
