"""Configuration of an edge agent (`pice edge`), validated with messages that name the value."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONNECT_PATH = "/v1/edges/connect"
_EDGE_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def default_edge_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].lstrip("._-")
    return host or "edge"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cloud: str  # ws(s):// or http(s):// URL of the cloud; the connect path is added if absent
    token: str = Field(min_length=1)  # this edge's token (`pice edge-token create`)
    edge_id: str = Field(default_factory=default_edge_id, pattern=_EDGE_ID)
    models: list[str] = Field(min_length=1)  # model specs to serve
    slots: int = Field(8, ge=1, le=4096)  # points run at once (the hub never sends more)
    ca_file: Path | None = None  # CA bundle that signs the cloud's certificate (wss:// only)
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: finish work this long, then hand back
    backoff_initial_s: float = Field(0.5, gt=0)  # first reconnect delay, doubled per failure
    backoff_max_s: float = Field(30.0, gt=0)  # reconnect delay cap (each delay gets jitter)
    connect_timeout_s: float = Field(10.0, gt=0)

    @field_validator("cloud")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        if scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"cloud must be a ws://, wss://, http:// or https:// URL with a "
                             f"host, got {v!r}")
        path = parts.path.rstrip("/") or CONNECT_PATH
        return urlunsplit((scheme, parts.netloc, path, parts.query, ""))

    @model_validator(mode="after")
    def _tls(self) -> AgentConfig:
        if self.ca_file is not None:
            if not self.cloud.startswith("wss://"):
                raise ValueError(f"ca_file needs a wss:// (or https://) cloud URL, got "
                                 f"{self.cloud!r}")
            if not self.ca_file.is_file():
                raise ValueError(f"ca_file {str(self.ca_file)!r} is not a file")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s "
                             f"({self.backoff_initial_s})")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.cloud.startswith("wss://"):
            return None
        return ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None)
