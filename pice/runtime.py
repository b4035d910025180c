"""The composition root: resolve and load the models, start in-process edge workers, wire them
into the cloud pipeline. (It alone imports both `pice.cloud` and `pice.edge`.)"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from pice.cloud.backends import cloud_generator
from pice.cloud.edge_base import DeadlineConfig
from pice.cloud.edge_hub import EdgeHub
from pice.cloud.edge_pool import EdgePool
from pice.cloud.edge_tokens import EdgeTokenStore
from pice.cloud.ensemble import EnsembleConfig, Source
from pice.cloud.guard import GuardConfig
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import Pipeline
from pice.cloud.sketcher import parse_sketch, sketch_messages
from pice.edge.agent import EdgeAgent
from pice.edge.agent_config import AgentConfig
from pice.edge.distill import (
    EXPANDER_ADAPTER,
    DistillConfig,
    generate_pairs,
    load_questions,
    shipped_adapter,
    train_adapter,
)
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.scheduler.router import SuitabilityRouter
from pice.scheduler.service import Scheduler
from pice.shared.backend import TextGenerator
from pice.shared.config import ServeSettings
from pice.shared.engine.generator import EngineGenerator
from pice.shared.errors import PiceError
from pice.shared.hf_backend import HFGenerator
from pice.shared.models import resolve_model
from pice.shared.sampling import SamplingParams
from pice.shared.worker import CLOUD_WORKER_ID

log = logging.getLogger(__name__)


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def load_generator(spec: str, settings: ServeSettings, progress: bool = True) -> TextGenerator:
    # the engine reads a GGUF model's weights from the GGUF itself (kept quantized, or
    # dequantised / requantized on load as asked): only transformers needs a dense fp32 copy
    resolved = resolve_model(spec, settings.cache_dir, progress=progress,
                             dense=settings.backend == "hf")
    log.info("loading %s from %s (%s, backend %s)", spec, resolved.path, resolved.source,
             settings.backend)
    if settings.backend == "hf":
        return HFGenerator(resolved.path, name=spec, max_context=settings.max_context)
    return EngineGenerator(resolved.path, name=spec, max_context=settings.max_context,
                           gguf=resolved.gguf,
                           quantization=settings.quantization, kv_cache_gb=settings.kv_cache_gb,
                           lora_max_rank=settings.lora_max_rank, lora_slots=settings.lora_slots)


def edge_hub(settings: ServeSettings) -> EdgeHub | None:
    """The registry of remote edge agents, when agent tokens are configured."""
    if settings.edge_tokens_file is None:
        return None
    return EdgeHub(EdgeTokenStore(settings.edge_tokens_file), settings.edge_heartbeat_s,
                   settings.edge_lease_s)


def run_edge_agent(cfg: AgentConfig, settings: ServeSettings, progress: bool = True) -> int:
    """`pice edge`: load the agent's models (and the shipped expander adapter, as the server
    does) with the server's loader, measure the decode rate, then serve."""
    set_threads(settings.threads)
    workers = {spec: EdgeWorker(cfg.edge_id, load_generator(spec, settings, progress))
               for spec in cfg.models}
    for spec, worker in workers.items():
        path = shipped_adapter(spec) if settings.expander_adapter else None
        if path is not None:
            try:
                worker.generator.add_adapter(EXPANDER_ADAPTER, path)
            except PiceError as exc:
                log.warning("expander adapter for %s not loaded: %s", spec, exc)
    agent = EdgeAgent(cfg, workers)
    log.info("edge %s: %.1f tokens/s on %s; peak RSS %.2f GB", cfg.edge_id, agent.measure(),
             cfg.models[0], peak_rss_gb())
    return asyncio.run(agent.run())


def build_pipeline(settings: ServeSettings, metrics: Metrics, progress: bool = True,
                   cloud: TextGenerator | None = None) -> Pipeline:
    """`cloud`: a cloud model served elsewhere (the Ray app's deployment handle); None → the
    one PICE_CLOUD_BACKEND names."""
    set_threads(settings.threads)
    loaded: dict[str, TextGenerator] = {}

    def get(spec: str) -> TextGenerator:
        if spec not in loaded:  # one copy per distinct model, shared by cloud and edge
            loaded[spec] = load_generator(spec, settings, progress)
        return loaded[spec]

    cloud = cloud or cloud_generator(settings, get, progress)
    workers = [EdgeWorker(f"edge-{i}", get(spec)) for i, spec in enumerate(settings.edge_models)
               if settings.local_edges]
    log.info("models loaded (%s); peak RSS %.2f GB", ", ".join(loaded) or "none",
             peak_rss_gb())
    policy = PolicyConfig(default_max_points=settings.default_max_points,
                          words_per_point=settings.words_per_point,
                          point_tokens=settings.point_tokens)
    edge_generators = ({spec: get(spec) for spec in settings.edge_models}
                       if settings.local_edges else {})
    # the router's weights and MiniLM load once, here, not on the first question
    cloud_slots = cloud.engine.cfg.max_num_seqs if isinstance(cloud, EngineGenerator) else 0
    scheduler = Scheduler.build(settings.policy, policy, SuitabilityRouter(warm=True),
                                cloud_slots)
    deadlines = DeadlineConfig(floor_s=settings.edge_deadline_floor_s,
                               multiplier=settings.edge_deadline_multiplier,
                               min_tokens_per_s=settings.edge_deadline_min_rate,
                               suspect_s=settings.edge_suspect_s)
    pool = EdgePool(workers, hub=edge_hub(settings), deadlines=deadlines)
    return Pipeline(cloud, pool, policy, metrics,
                    cloud_worker=EdgeWorker(CLOUD_WORKER_ID, cloud),
                    edge_generators=edge_generators, scheduler=scheduler,
                    ensemble=ensemble_config(settings, edge_generators))


def ensemble_config(settings: ServeSettings,
                    generators: dict[str, TextGenerator]) -> EnsembleConfig:
    """Ensemble candidates in order of preference: the shipped distilled adapter on its edge
    model (where it loads), then each edge model's base; the scheduler's k picks how many."""
    sources: list[Source] = []
    for spec, gen in generators.items():
        path = shipped_adapter(spec) if settings.expander_adapter else None
        if path is None:
            continue
        try:
            gen.add_adapter(EXPANDER_ADAPTER, path)
        except PiceError as exc:  # e.g. the hf backend serves no adapters
            log.warning("expander adapter for %s not loaded: %s", spec, exc)
            continue
        sources.append(Source(model=spec, adapter=EXPANDER_ADAPTER))
    sources += [Source(model=spec) for spec in dict.fromkeys(settings.edge_models)]
    return EnsembleConfig(sources=sources, k=len(sources),
                          guard=GuardConfig(enabled=settings.guard,
                                            threshold=settings.guard_threshold))


def sketch_batch(cloud: TextGenerator, max_points: int, words_per_point: int,
                 ) -> Callable[[list[str]], list[list[str]]]:
    """Questions → their sketches, one batched generation on the cloud model ([] if unusable)."""
    def run(questions: list[str]) -> list[list[str]]:
        prompts = [cloud.render_chat(sketch_messages(q, max_points, words_per_point))
                   for q in questions]
        params = SamplingParams(max_tokens=8 + max_points * (words_per_point * 2 + 4))
        return [parse_sketch(o.text, max_points, words_per_point)
                for o in cloud.generate(prompts, params)]
    return run


def train_expander(cfg: DistillConfig, stage: str = "all", progress: bool = True) -> dict[str, Any]:
    """`pice train expander`: teacher data from the cloud model (stage "data"), then the LoRA
    for the edge model (stage "train"); "all" does both. Returns what was done."""
    settings = ServeSettings(cloud_model=cfg.cloud_model, edge_models=[cfg.edge_model],
                             cache_dir=cfg.cache_dir, threads=cfg.threads)
    set_threads(settings.threads)
    report: dict[str, Any] = {}
    if stage in ("all", "data"):
        t0 = time.perf_counter()
        teacher = load_generator(cfg.cloud_model, settings, progress)
        written = generate_pairs(load_questions(cfg.questions, cfg.limit), teacher,
                                 sketch_batch(teacher, cfg.max_points, cfg.words_per_point),
                                 cfg.pairs_path, cfg.batch_questions, cfg.point_tokens, progress)
        report["data"] = {"questions_written": written, "pairs": str(cfg.pairs_path),
                          "seconds": time.perf_counter() - t0}
    if stage in ("all", "train"):
        base = resolve_model(cfg.edge_model, cfg.cache_dir, progress=progress).path
        report["train"] = train_adapter(cfg, base, progress)
    return report
