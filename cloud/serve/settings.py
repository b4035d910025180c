"""PICE_RAY_* settings: replicas, resources and autoscaling of the Serve deployments."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PICE_RAY_", extra="forbid")

    address: str | None = None  # an existing cluster (ray://… or host:port); None → start one
    num_cpus: int | None = Field(None, ge=1)  # CPUs of a cluster started here (None: all)
    app_name: str = "pice"
    # gateway: the FastAPI app; scales on ongoing requests per replica
    gateway_min_replicas: int = Field(1, ge=1, le=1000)
    gateway_max_replicas: int = Field(4, ge=1, le=1000)
    gateway_num_cpus: float = Field(0.5, ge=0, le=1024)  # defaults fit a 2-core machine
    gateway_max_ongoing: int = Field(256, ge=1, le=100_000)  # requests a replica holds at once
    gateway_target_ongoing: float = Field(64, gt=0, le=100_000)
    # cloud model: one engine or backend per replica
    cloud_min_replicas: int = Field(1, ge=0, le=1000)
    cloud_max_replicas: int = Field(4, ge=1, le=1000)
    cloud_num_cpus: float = Field(1.0, ge=0, le=1024)
    cloud_num_gpus: float = Field(0.0, ge=0, le=64)
    cloud_max_ongoing: int = Field(32, ge=1, le=100_000)  # the engine batches these
    cloud_target_ongoing: float = Field(8, gt=0, le=100_000)
    upscale_delay_s: float = Field(30.0, ge=0, le=3600)
    downscale_delay_s: float = Field(600.0, ge=0, le=86400)
    cloud_retries: int = Field(3, ge=0, le=100)  # a request re-sent when its replica dies

    @model_validator(mode="after")
    def _ranges(self) -> RaySettings:
        for name in ("gateway", "cloud"):
            lo, hi = getattr(self, f"{name}_min_replicas"), getattr(self, f"{name}_max_replicas")
            if lo > hi:
                raise ValueError(f"{name}_min_replicas ({lo}) exceeds {name}_max_replicas ({hi})")
        return self

    def autoscaling(self, name: str) -> dict[str, Any]:
        return {"min_replicas": getattr(self, f"{name}_min_replicas"),
                "max_replicas": getattr(self, f"{name}_max_replicas"),
                "initial_replicas": max(1, getattr(self, f"{name}_min_replicas")),
                "target_ongoing_requests": getattr(self, f"{name}_target_ongoing"),
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}
