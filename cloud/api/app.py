"""App factory. The lifespan loads the models in a background thread, so /health answers at
once and /ready turns 200 when the pipeline is up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from pice.cloud.adapter_catalog import open_catalog
from pice.cloud.api import adapters, chat, edges, ops, playground, progressive
from pice.cloud.api.deps import get_tenant
from pice.cloud.api.errors import install_error_handlers
from pice.cloud.api.limits import RequestLimits
from pice.cloud.api.openapi import install_openapi
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import Pipeline
from pice.cloud.tenants import TenantRegistry
from pice.shared.config import ServeSettings

log = logging.getLogger(__name__)

Builder = Callable[[ServeSettings, Metrics], Pipeline]


def create_app(settings: ServeSettings, builder: Builder) -> FastAPI:
    """`builder` loads the models and returns the pipeline (`pice.runtime.build_pipeline`)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                pipeline = await asyncio.to_thread(builder, settings, metrics)
                reserved = {"pice", pipeline.cloud.name, *pipeline.edge_generators}
                app.state.adapters = await asyncio.to_thread(
                    open_catalog, settings, pipeline.edge_generators, reserved)
                app.state.pipeline = pipeline  # ready: set last
                log.info("pice ready: cloud=%s edges=%s", settings.cloud_model,
                         settings.edge_models)
            except Exception as exc:
                log.exception("model loading failed")
                app.state.load_error = f"model loading failed: {exc}"

        task = asyncio.create_task(load())
        yield
        task.cancel()

    app = FastAPI(title="pice", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pipeline = None
    app.state.load_error = None
    app.state.tenants = TenantRegistry.load(settings.api_keys_file)  # bad file: fail now
    app.state.adapters = None
    install_error_handlers(app, lambda status: metrics.errors.labels(str(status)).inc())
    app.add_middleware(RequestLimits, tenants=app.state.tenants, metrics=metrics,
                       rate=settings.rate_limit_rps, burst=settings.rate_limit_burst,
                       max_streams=settings.max_streams_per_client,
                       limit_open_clients=settings.limit_open_clients)
    metrics.runtime.watch(lambda: app.state.pipeline,
                          lambda: getattr(app.state, "connection_bounds", None))
    for router in (chat.router, progressive.router, adapters.router):  # tenants' API: keys
        app.include_router(router, dependencies=[Depends(get_tenant)])
    for router in (ops.router, edges.router):  # agents authenticate with edge tokens
        app.include_router(router)
    app.include_router(playground.router)  # the browser page at /: it sends the user's key
    install_openapi(app)
    return app
