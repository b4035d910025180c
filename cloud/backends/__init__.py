"""Cloud backends behind the one `TextGenerator` interface, chosen by PICE_CLOUD_BACKEND:
`local` (pice's engine, or transformers with PICE_BACKEND=hf), `openai` (any OpenAI-compatible
server over HTTP) or `vllm` (vLLM's async engine in-process, the `vllm` extra)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pice.shared.backend import TextGenerator
from pice.shared.config import ServeSettings
from pice.shared.models import resolve_model
from pice.shared.tokenizer import ChatTokenizer

BACKENDS = ("local", "openai", "vllm")


def cloud_generator(settings: ServeSettings, load_local: Callable[[str], TextGenerator],
                    progress: bool = True) -> TextGenerator:
    """The cloud model for `settings.cloud_backend`. `load_local` loads a local model spec (the
    runtime's loader, which shares one copy between cloud and edge)."""
    kind = settings.cloud_backend
    if kind == "local":
        return load_local(settings.cloud_model)
    if kind == "openai":
        from pice.cloud.backends.openai_backend import OpenAIGenerator, OpenAISettings

        cfg = OpenAISettings()
        tokenizer = None
        if cfg.tokenizer is not None:
            path = resolve_model(cfg.tokenizer, settings.cache_dir, progress=progress,
                                 dense=False).path  # the tokenizer only
            tokenizer = ChatTokenizer(str(path), settings.max_context)
        return OpenAIGenerator(settings.cloud_model, cfg, settings.max_context, tokenizer)
    if kind == "vllm":
        from pice.cloud.backends.vllm_backend import VLLMGenerator, VLLMSettings

        resolved = resolve_model(settings.cloud_model, settings.cache_dir, progress=progress)
        return VLLMGenerator(Path(resolved.path), settings.cloud_model, settings.max_context,
                             VLLMSettings())
    raise ValueError(f"unknown cloud backend {kind!r}; choose one of {', '.join(BACKENDS)}")
