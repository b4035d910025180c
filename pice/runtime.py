"""The composition root: resolve and load the models, start in-process edge workers, wire them
into the cloud pipeline. (It alone imports both `pice.cloud` and `pice.edge`.)"""

from __future__ import annotations

import logging

import torch

from pice.cloud.edge_pool import EdgePool
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import Pipeline
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.shared.backend import TextGenerator
from pice.shared.config import ServeSettings
from pice.shared.engine.generator import EngineGenerator
from pice.shared.hf_backend import HFGenerator
from pice.shared.models import resolve_model
from pice.shared.worker import CLOUD_WORKER_ID

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def load_generator(spec: str, settings: ServeSettings, progress: bool = True) -> TextGenerator:
    resolved = resolve_model(spec, settings.cache_dir, progress=progress)
    log.info("loading %s from %s (%s, backend %s)", spec, resolved.path, resolved.source,
             settings.backend)
    if settings.backend == "hf":
        return HFGenerator(resolved.path, name=spec, max_context=settings.max_context)
    return EngineGenerator(resolved.path, name=spec, max_context=settings.max_context,
                           quantization=settings.quantization, kv_cache_gb=settings.kv_cache_gb,
                           lora_max_rank=settings.lora_max_rank, lora_slots=settings.lora_slots)


def build_pipeline(settings: ServeSettings, metrics: Metrics, progress: bool = True) -> Pipeline:
    set_threads(settings.threads)
    loaded: dict[str, TextGenerator] = {}

    def get(spec: str) -> TextGenerator:
        if spec not in loaded:  # one copy per distinct model, shared by cloud and edge
            loaded[spec] = load_generator(spec, settings, progress)
        return loaded[spec]

    cloud = get(settings.cloud_model)
    workers = [EdgeWorker(f"edge-{i}", get(spec)) for i, spec in enumerate(settings.edge_models)]
    policy = PolicyConfig(default_max_points=settings.default_max_points,
                          words_per_point=settings.words_per_point,
                          point_tokens=settings.point_tokens)
    edge_generators = {spec: get(spec) for spec in settings.edge_models}
    return Pipeline(cloud, EdgePool(workers), policy, metrics,
                    cloud_worker=EdgeWorker(CLOUD_WORKER_ID, cloud),
                    edge_generators=edge_generators)
