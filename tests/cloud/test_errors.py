"""Bodies a user gets wrong, through a real server: the message says what to change (UTF-8,
JSON and its content-type, the line and column of a syntax error) and `param` is null."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import LiveServer

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(("path", "raw", "headers", "needles"), [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', JSON,
     ["not UTF-8", "0xe9", "offset 46", "send JSON encoded as UTF-8"]),
    ("/v1/progressive", b'{"question": "\xff"}', JSON, ["not UTF-8", "0xff"]),
    ("/v1/chat/completions", b'{"messages": []}', {}, ["content-type: application/json",
                                                       "no content-type was sent"]),
    ("/v1/chat/completions", b'{"messages": []}', {"content-type": "text/plain"},
     ["JSON object", "'text/plain' was sent"]),
    ("/v1/progressive", b"", {"content-type": "application/x-www-form-urlencoded"},
     ["content-type: application/json"]),
    ("/v1/chat/completions", b'{\n  "messages": [\n    {"role": "user",}\n  ]\n}', JSON,
     ["not valid JSON", "line 3 column 21"]),
    ("/v1/progressive", b'{"question": "hi"', JSON, ["not valid JSON", "line 1 column 18"]),
    ("/v1/chat/completions", b"", JSON, ["body is empty", "JSON object"]),
    ("/v1/adapters", b'{"name": "x",\n "path": }', JSON, ["not valid JSON", "line 2 column 10"]),
    ("/v1/adapters", b'{"name": "\xff"}', JSON, ["not UTF-8", "0xff"]),
])
def test_body_errors_say_what_to_fix(server: LiveServer, path: str, raw: bytes,
                                     headers: dict[str, str], needles: list[str]) -> None:
    r = httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is None, err
    assert err["type"] == "invalid_request_error"
    for needle in needles:
        assert needle in err["message"], err["message"]
