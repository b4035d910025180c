"""API keys → tenants. Keys are stored only as sha256 hashes in a JSON file named by
`ServeSettings.api_keys_file`:

    {"tenants": {"acme": ["sha256:<64 hex digits>"], "globex": ["sha256:..."]}}

Keys must be random (`python -m pice.cloud.tenants new-key acme` makes one and prints the line
to add), so a fast hash suffices: nobody can brute-force 256 random bits. With no file the server
is open and every request belongs to the one tenant "default"."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pice.shared.errors import AuthenticationError, BadRequestError

DEFAULT_TENANT = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # tenant and adapter names
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key and its stored form."""
    key = "pk-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


@dataclass(frozen=True)
class Tenant:
    name: str


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, list[str]]

    @field_validator("tenants")
    @classmethod
    def _check(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        seen: dict[str, str] = {}
        for name, hashes in v.items():
            if not NAME_RE.match(name):
                raise ValueError(f"tenant name {name!r} must match {NAME_RE.pattern}")
            for h in hashes:
                if not _HASH_RE.match(h):
                    raise ValueError(f"tenant {name!r}: key hash {h[:16]!r}... is not "
                                     "'sha256:' followed by 64 lowercase hex digits")
                if h in seen and seen[h] != name:
                    raise ValueError(f"one key hash is listed for both {seen[h]!r} and {name!r}")
                seen[h] = name
        return v


class TenantRegistry:
    """Who is calling. `open` (no keys configured): everyone is the default tenant."""

    def __init__(self, by_hash: dict[str, str] | None = None) -> None:
        self._by_hash = dict(by_hash or {})

    @property
    def open(self) -> bool:
        return not self._by_hash

    @classmethod
    def load(cls, path: Path | None) -> TenantRegistry:
        """Read the keys file; a bad file is refused with a message naming the problem."""
        if path is None:
            return cls()
        try:
            parsed = KeysFile.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise BadRequestError(f"api_keys_file {path}: cannot read it ({exc.strerror})",
                                  field="api_keys_file") from exc
        except ValidationError as exc:
            raise BadRequestError(f"api_keys_file {path}: {exc}", field="api_keys_file") from exc
        by_hash = {h: name for name, hashes in parsed.tenants.items() for h in hashes}
        if not by_hash:
            raise BadRequestError(f"api_keys_file {path} lists no keys; leave it unset for "
                                  "open mode", field="api_keys_file")
        return cls(by_hash)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant owning the `Authorization: Bearer <key>` header's key."""
        if self.open:
            return Tenant(DEFAULT_TENANT)
        if not authorization:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        name = self._by_hash.get(hash_key(key.strip()))
        if name is None:
            raise AuthenticationError("invalid API key")
        return Tenant(name)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "new-key" or not NAME_RE.match(argv[1]):
        print("usage: python -m pice.cloud.tenants new-key <tenant>", file=sys.stderr)
        return 2
    key, hashed = new_key()
    print(f"key (give it to {argv[1]}; it is not stored): {key}")
    print("add to the keys file:", json.dumps({"tenants": {argv[1]: [hashed]}}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
