"""Building and running the Serve application: `build_app` (for `serve run` config files and
KubeRay's serveConfigV2: `import_path: pice.cloud.serve.app:build_app`) and `run` (`pice serve
--ray`)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, cast

from ray import serve
from ray.serve.config import RequestRouterConfig

from pice.cloud.serve.deployments import CloudModel, Gateway
from pice.cloud.serve.settings import RaySettings
from pice.shared.config import ServeSettings

log = logging.getLogger(__name__)

ROUTER = "pice.cloud.serve.routing:AffinityRouter"


def application(settings: ServeSettings, ray_settings: RaySettings) -> Any:
    """The bound application: Gateway(CloudModel)."""
    env = {"vars": {k: v for k, v in os.environ.items() if k.startswith("PICE_")}}
    deployment: Any = serve.deployment
    cloud = deployment(
        name="CloudModel", autoscaling_config=ray_settings.autoscaling("cloud"),
        max_ongoing_requests=ray_settings.cloud_max_ongoing,
        ray_actor_options={"num_cpus": ray_settings.cloud_num_cpus,
                           "num_gpus": ray_settings.cloud_num_gpus, "runtime_env": env},
        request_router_config=RequestRouterConfig(request_router_class=cast(Any, ROUTER)),
        health_check_period_s=10, health_check_timeout_s=30)(CloudModel)
    gateway = deployment(
        name="Gateway", autoscaling_config=ray_settings.autoscaling("gateway"),
        max_ongoing_requests=ray_settings.gateway_max_ongoing,
        ray_actor_options={"num_cpus": ray_settings.gateway_num_cpus, "runtime_env": env})(Gateway)
    blob = settings.model_dump_json()
    return gateway.bind(cloud.bind(blob), blob, ray_settings.cloud_retries)


def build_app(args: dict[str, Any]) -> Any:
    """`serve run` / serveConfigV2 builder. `args` may hold `settings` and `ray` dicts
    (ServeSettings and RaySettings fields); PICE_* / PICE_RAY_* variables fill the rest."""
    return application(ServeSettings(**(args.get("settings") or {})),
                       RaySettings(**(args.get("ray") or {})))


def run(settings: ServeSettings, ray_settings: RaySettings, blocking: bool = True) -> None:
    """`pice serve --ray`: join (or start) a Ray cluster, start Serve's proxy on host:port and
    deploy the application."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_settings.address, num_cpus=ray_settings.num_cpus,
                 include_dashboard=False, namespace="pice")
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, ray_settings), name=ray_settings.app_name,
              route_prefix="/", blocking=False)
    log.info("pice on Ray Serve: http://%s:%d (GET /ready turns 200 when models are loaded)",
             settings.host, settings.port)
    while blocking:
        time.sleep(3600)
