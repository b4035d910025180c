"""Edge-agent tokens: one or more per edge, stored only as sha256 hashes in a JSON file, revocable.
`pice edge-token create|list|revoke` edits the file; the hub rereads it when it changes, so a
revoked token is refused at the next connect and its live connection is closed."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from pice.shared.errors import BadRequestError, NotFoundError

_PREFIX = "pice-edge"
EDGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class TokenRecord(BaseModel):
    token_id: str  # public half of the token (shown by `list`, used by `revoke`)
    edge_id: str = Field(pattern=EDGE_ID_PATTERN)  # the only edge id this token may register
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # hash of the whole token
    created: str  # ISO time
    revoked: str | None = None  # ISO time of revocation (None: active)


class TokenFile(BaseModel):
    version: int = 1
    tokens: list[TokenRecord] = Field(default_factory=list)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EdgeTokenStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._data = TokenFile()

    def load(self) -> TokenFile:
        """The file's records, reread when it changed (a missing file holds no token)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._data = None, TokenFile()
            return self._data
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            try:
                self._data = TokenFile.model_validate_json(self.path.read_bytes())
            except ValidationError as exc:
                raise BadRequestError(f"edge token file {self.path} is malformed: "
                                      f"{exc.errors()[0]['msg']}") from None
            self._stamp = stamp
        return self._data

    def _save(self, data: TokenFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".edge-tokens-")
        with os.fdopen(fd, "w") as f:  # mkstemp files are 0600: hashes stay private
            f.write(data.model_dump_json(indent=2))
        os.replace(tmp, self.path)

    def create(self, edge_id: str) -> tuple[TokenRecord, str]:
        """A new token for `edge_id`: its record and the token itself (shown once, never
        stored)."""
        token_id = secrets.token_hex(6)
        token = f"{_PREFIX}.{token_id}.{secrets.token_urlsafe(32)}"
        try:
            record = TokenRecord(token_id=token_id, edge_id=edge_id, sha256=_hash(token),
                                 created=_now())
        except ValidationError:
            raise BadRequestError(f"edge id must match {EDGE_ID_PATTERN}, got {edge_id!r}",
                                  field="edge_id") from None
        data = self.load().model_copy(deep=True)
        data.tokens.append(record)
        self._save(data)
        return record, token

    def revoke(self, name: str) -> list[TokenRecord]:
        """Revoke a token by its id, or every token of an edge by the edge id."""
        data = self.load().model_copy(deep=True)
        hit = [r for r in data.tokens if r.revoked is None and name in (r.token_id, r.edge_id)]
        if not hit:
            raise NotFoundError(f"no active edge token with id or edge id {name!r} in "
                                f"{self.path}")
        for r in hit:
            r.revoked = _now()
        self._save(data)
        return hit

    def verify(self, token: str) -> TokenRecord | None:
        """The active record of a presented token, or None (unknown, malformed or revoked)."""
        parts = token.split(".", 2)
        if len(parts) != 3 or parts[0] != _PREFIX:
            return None
        digest = _hash(token)
        for r in self.load().tokens:
            if r.token_id == parts[1] and hmac.compare_digest(r.sha256, digest):
                return r if r.revoked is None else None
        return None

    def is_active(self, token_id: str) -> bool:
        return any(r.token_id == token_id and r.revoked is None for r in self.load().tokens)


def edge_token_main(action: str, name: str | None, path: Path | None) -> int:
    """`pice edge-token create EDGE_ID | list | revoke TOKEN_ID_OR_EDGE_ID`."""
    if path is None:
        raise BadRequestError("no edge token file: pass --file or set PICE_EDGE_TOKENS_FILE",
                              field="edge_tokens_file")
    store = EdgeTokenStore(path)
    if action == "list":
        rows = [r.model_dump() for r in store.load().tokens]
        print(json.dumps(rows, indent=2))
        return 0
    if not name:
        raise BadRequestError(f"edge-token {action} needs a name", field="name")
    if action == "create":
        record, token = store.create(name)
        print(f"edge {record.edge_id}: token {record.token_id} created; it is shown only "
              "once:", file=sys.stderr)
        print(token)
        return 0
    assert action == "revoke", action
    for r in store.revoke(name):
        print(f"revoked token {r.token_id} of edge {r.edge_id}", file=sys.stderr)
    return 0
