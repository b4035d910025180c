"""Typed configuration. `ServeSettings` reads PICE_* environment variables (pydantic-settings);
every bad value is refused with a message that names it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pice.shared.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL


class ServeSettings(BaseSettings):
    """The embedded default server: API + scheduler + cloud model + in-process edge workers."""

    model_config = SettingsConfigDict(env_prefix="PICE_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0 → pick a free port (tests)
    cloud_model: str = DEFAULT_CLOUD_MODEL  # alias, local dir, .gguf file or hub id
    # the ensemble's edge models (the first is preferred when one candidate runs per point)
    edge_models: list[str] = Field(
        default_factory=lambda: [DEFAULT_EDGE_MODEL, "gemma-3-270m"])
    cache_dir: Path | None = None  # None → $PICE_CACHE_DIR or ~/.cache/pice
    max_context: int = Field(4096, ge=64, le=131072)  # per-request prompt + completion cap
    default_max_tokens: int = Field(512, ge=1, le=131072)
    threads: int = Field(0, ge=0, le=1024)  # torch intra-op threads; 0 → all cores
    backend: Literal["engine", "hf"] = "engine"  # our paged-KV engine, or transformers generate
    # who serves the cloud model: local (`backend` above), openai (an OpenAI-compatible server,
    # PICE_OPENAI_*) or vllm (vLLM in-process, PICE_VLLM_*); see pice.cloud.backends
    cloud_backend: Literal["local", "openai", "vllm"] = "local"
    # engine weights: None = the GGUF's own quantized tensors for GGUF models, else float;
    # "none" = float even from a GGUF; "int8"/"int4" weight-only (per 32 values one scale)
    quantization: Literal["gguf", "int8", "int4", "none"] | None = None
    kv_cache_gb: float = Field(1.0, gt=0, le=1024)  # engine: KV-cache pool per model
    lora_max_rank: int = Field(64, ge=1, le=128)  # engine: largest LoRA adapter rank accepted
    lora_slots: int = Field(8, ge=1, le=4096)  # engine: adapters resident on the device at once
    default_max_points: int = Field(6, ge=1, le=10)
    words_per_point: int = Field(5, ge=1, le=20)
    point_tokens: int = Field(64, ge=8, le=1024)  # edge budget per point
    # remote edge agents (`pice edge`): accepted when a token file is set (`pice edge-token`)
    edge_tokens_file: Path | None = None  # JSON file of hashed agent tokens (None → agents off)
    local_edges: bool = True  # run in-process edge workers for edge_models (False: agents only)
    edge_heartbeat_s: float = Field(2.0, gt=0, le=300)  # agent heartbeat and hub ping period
    edge_lease_s: float = Field(6.0, gt=0, le=3600)  # an agent silent this long is declared dead
    # a remote edge batch's deadline: floor + 2 × RTT + multiplier × its largest token budget at
    # the edge's measured per-stream rate (never below min rate); a miss moves its points to
    # another edge or the cloud, cancels them on the edge and benches the edge for suspect_s
    edge_deadline_floor_s: float = Field(30.0, gt=0, le=3600)
    edge_deadline_multiplier: float = Field(4.0, ge=1, le=1000)
    edge_deadline_min_rate: float = Field(1.0, gt=0, le=1e6)  # tokens/s assumed at worst
    edge_suspect_s: float = Field(60.0, ge=0, le=86400)
    # connection bounds: a request's headers must arrive within header_timeout_s and its body
    # must not stall longer than body_timeout_s; idle keep-alive connections close after
    # keep_alive_s; WebSockets are pinged every ws_ping_s and dropped without a pong as long
    max_connections: int = Field(1024, ge=8, le=1_000_000)  # open at once (the oldest idle one
    # is closed to make room); lowered to fit the process's file-descriptor limit
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    keep_alive_s: int = Field(5, ge=1, le=3600)
    ws_ping_s: float = Field(20.0, gt=0, le=3600)
    # generation requests (chat, progressive) running at once per tenant; over it → 429 with
    # Retry-After
    max_streams_per_client: int = Field(16, ge=1, le=100_000)
    # per API key (a missing or invalid key: per client address): token bucket of burst requests,
    # refilled at rate_limit_rps per second; over it → 429 with Retry-After; 0 → no limit
    rate_limit_rps: float = Field(20.0, ge=0, le=1e6)
    rate_limit_burst: int = Field(40, ge=1, le=1_000_000)
    # with no API keys (an open server) both limits apply per client address only when set
    limit_open_clients: bool = False
    # ensemble expansion: quality guard and the distilled expansion adapter
    guard: bool = True  # re-expand empty, cut-off and low-scoring points in the cloud
    guard_threshold: float = Field(0.4, ge=0.0, le=1.0)  # selection score below → repair
    expander_adapter: bool = True  # load the shipped distilled adapter for its edge model
    # scheduler policy for `auto` requests
    policy: Literal["dynamic", "router-only", "always-cloud", "always-progressive"] = "dynamic"
    # tenants: JSON {"tenants": {name: ["sha256:<hex of the key>", ...]}}; None → open, one
    # tenant "default" (no key needed)
    api_keys_file: Path | None = None
    state_dir: Path | None = None  # adapter catalog + stored adapters; None → <cache>/state
    adapter_import_dirs: list[Path] = Field(default_factory=list)  # roots a tenant may register
    adapter_upload_mb: int = Field(512, ge=1, le=65536)  # per uploaded file
    aas_threshold: float = Field(0.2, ge=-1.0, le=1.0)  # below it AAS picks no adapter
    aas_margin: float = Field(0.03, ge=0.0, le=1.0)  # near-tie: prefer a resident adapter

    @field_validator("edge_models")
    @classmethod
    def _need_edges(cls, v: list[str]) -> list[str]:
        if not v or any(not s.strip() for s in v):
            raise ValueError(f"edge_models must name at least one non-empty model spec, got {v!r}")
        return v

    @model_validator(mode="after")
    def _edge_agents(self) -> ServeSettings:
        if self.edge_lease_s <= self.edge_heartbeat_s:
            raise ValueError(f"edge_lease_s ({self.edge_lease_s}) must be longer than "
                             f"edge_heartbeat_s ({self.edge_heartbeat_s})")
        if not self.local_edges and self.edge_tokens_file is None:
            raise ValueError("local_edges=false needs edge_tokens_file: with neither there is "
                             "no edge at all")
        return self

    @field_validator("cloud_model")
    @classmethod
    def _need_cloud(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("cloud_model must be a non-empty model spec")
        return v
