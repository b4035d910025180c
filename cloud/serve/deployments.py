"""The Serve deployments: `CloudModel` (one engine or backend per replica) and `Gateway` (the
FastAPI app of `pice serve`, its cloud model being the `CloudModel` deployment). Settings cross
as JSON text."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve

from pice.cloud.api.app import create_app
from pice.cloud.backends import cloud_generator
from pice.cloud.edge_tokens import EdgeTokenStore
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import Pipeline
from pice.cloud.serve.edge_relay import ClusterHub
from pice.cloud.serve.registry import get_registry
from pice.cloud.serve.remote_cloud import ROUTE, RemoteCloud, RequestRoute
from pice.runtime import build_pipeline, load_generator, set_threads
from pice.shared.aio import iterate_in_thread
from pice.shared.config import ServeSettings
from pice.shared.sampling import SamplingParams

log = logging.getLogger(__name__)

SESSION_HEADER = b"x-pice-session"  # clients may pin a conversation to one cloud replica
REPLICA_HEADER = b"x-pice-replica"  # which gateway replica answered
CLOUD_HEADER = b"x-pice-cloud-replicas"  # which cloud replicas its cloud calls used


class CloudModel:
    """One cloud-model replica: `PICE_CLOUD_BACKEND` decides what runs (engine, vLLM, or an
    OpenAI-compatible upstream)."""

    def __init__(self, settings_json: str) -> None:
        settings = ServeSettings.model_validate_json(settings_json)
        set_threads(settings.threads)
        self.generator = cloud_generator(
            settings, lambda spec: load_generator(spec, settings, progress=False), progress=False)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": os.getpid(), "name": self.generator.name}

    async def generate(self, prompts: list[str], params: dict[str, Any],
                       adapters: Sequence[str | None] | None = None,
                       affinity: str = "") -> dict[str, Any]:
        sp = SamplingParams(**{**params, "stop": tuple(params["stop"]),
                               "stop_token_ids": tuple(params["stop_token_ids"])})
        outs = await asyncio.to_thread(self.generator.generate, prompts, sp, adapters)
        return {"replica": self.replica, "completions": [
            {"text": o.text, "prompt_tokens": o.prompt_tokens,
             "completion_tokens": o.completion_tokens, "finish_reason": o.finish_reason}
            for o in outs]}

    async def stream(self, prompt: str, params: dict[str, Any], adapter: str | None = None,
                     affinity: str = "") -> AsyncIterator[dict[str, str]]:
        sp = SamplingParams(**{**params, "stop": tuple(params["stop"]),
                               "stop_token_ids": tuple(params["stop_token_ids"])})
        yield {"replica": self.replica}
        async for delta in iterate_in_thread(self.generator.stream(prompt, sp, adapter)):
            yield {"text": delta}

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails; the engine raises if it died."""


class RouteMiddleware:
    """ASGI: a `RequestRoute` per request (affinity key: the session header, else a fresh id),
    the replica headers on every response, and the edge relay started with the app."""

    def __init__(self, app: Any, replica: str, on_startup: Any) -> None:
        self.app = app
        self.replica = replica.encode()
        self.on_startup = on_startup

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.on_startup()
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        session = dict(scope.get("headers") or ()).get(SESSION_HEADER)
        route = RequestRoute(key=session.decode()) if session else RequestRoute()
        token = ROUTE.set(route)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REPLICA_HEADER, self.replica),
                                      (CLOUD_HEADER, ",".join(route.cloud_replicas).encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            ROUTE.reset(token)


@serve.ingress()
class Gateway:
    """The FastAPI app; its cloud model is the `CloudModel` deployment; remote edge agents may
    connect to any replica (the registry actor relays points between replicas)."""

    def __init__(self, cloud: Any, settings_json: str, cloud_retries: int = 3) -> None:
        self.settings = ServeSettings.model_validate_json(settings_json)
        self.cloud = cloud
        self.cloud_retries = cloud_retries
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.hub: ClusterHub | None = None
        if self.settings.edge_tokens_file is not None:
            self.hub = ClusterHub(EdgeTokenStore(self.settings.edge_tokens_file),
                                  self.settings.edge_heartbeat_s, self.settings.edge_lease_s,
                                  get_registry(self.settings.edge_lease_s), self.replica)

    def _build(self, settings: ServeSettings, metrics: Metrics) -> Pipeline:
        cloud = RemoteCloud(self.cloud, settings, self.cloud_retries)
        pipeline = build_pipeline(settings, metrics, progress=False, cloud=cloud)
        if self.hub is not None:
            self.hub.tokens = pipeline.edges.hub.tokens if pipeline.edges.hub else self.hub.tokens
            pipeline.edges.hub = self.hub
        return pipeline

    def _start(self) -> None:
        if self.hub is not None and not self.hub.tasks:
            self.hub.start()

    def __serve_build_asgi_app__(self) -> Any:
        return RouteMiddleware(create_app(self.settings, self._build), self.replica, self._start)

    def check_health(self) -> None:
        """Alive while the event loop answers (models load in the background; /ready says when
        they are up)."""
