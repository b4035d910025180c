"""`PICE_CLOUD_BACKEND=vllm`: vLLM's async engine in-process (GPU machines; `pip install
pice[vllm]`). One event loop thread drives the engine; the blocking `TextGenerator` calls submit
to it. Prompts are rendered with the model's own chat template (pice's `ChatTokenizer`)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pice.shared.backend import ChatBackedGenerator
from pice.shared.errors import BadRequestError, ConflictError, NotFoundError
from pice.shared.lora.adapter import (
    WEIGHTS_FILE,
    AdapterInfo,
    _check_config,
    _read_config,
)
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer


class VLLMSettings(BaseSettings):
    """PICE_VLLM_* variables."""

    model_config = SettingsConfigDict(env_prefix="PICE_VLLM_", extra="forbid")

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    enable_lora: bool = True
    max_loras: int = Field(8, ge=1, le=1024)
    max_lora_rank: int = Field(64, ge=1, le=512)
    engine_args: dict[str, Any] = Field(default_factory=dict)  # any other AsyncEngineArgs field


class VLLMGenerator(ChatBackedGenerator):
    def __init__(self, path: Path, name: str, max_context: int, cfg: VLLMSettings) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # the optional extra

        self.name = name
        self.chat = ChatTokenizer(str(path), max_context)
        args = AsyncEngineArgs(model=str(path), max_model_len=max_context,
                               gpu_memory_utilization=cfg.gpu_memory_utilization,
                               tensor_parallel_size=cfg.tensor_parallel_size,
                               enable_lora=cfg.enable_lora, max_loras=cfg.max_loras,
                               max_lora_rank=cfg.max_lora_rank, **cfg.engine_args)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True).start()
        self.engine = self._wait(self._build(AsyncLLMEngine, args))
        self.lora_enabled = cfg.enable_lora
        self.max_lora_rank = cfg.max_lora_rank
        self._adapters: dict[str, tuple[int, Path, AdapterInfo]] = {}
        self._ids = itertools.count(1)

    async def _build(self, engine_cls: Any, args: Any) -> Any:
        return engine_cls.from_engine_args(args)

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VParams

        return VParams(max_tokens=params.max_tokens, temperature=params.temperature,
                       top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
                       seed=params.seed, stop=list(params.stop) or None,
                       stop_token_ids=list(params.stop_token_ids) or None,
                       ignore_eos=params.ignore_eos, min_tokens=params.min_tokens)

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if adapter not in self._adapters:
            raise NotFoundError(f"adapter {adapter!r} is not loaded", field="adapter")
        from vllm.lora.request import LoRARequest

        lora_id, path, _ = self._adapters[adapter]
        return LoRARequest(adapter, lora_id, str(path))

    async def _outputs(self, prompt: str, params: SamplingParams,
                       adapter: str | None) -> AsyncIterator[Any]:
        rid = f"pice-{next(self._ids)}"
        async for out in self.engine.generate(prompt, self._sampling(params), rid,
                                              lora_request=self._lora(adapter)):
            yield out

    async def _final(self, prompt: str, params: SamplingParams,
                     adapter: str | None) -> Completion:
        last = None
        async for out in self._outputs(prompt, params, adapter):
            last = out
        assert last is not None, "vLLM returned no output"
        o = last.outputs[0]
        return Completion(text=o.text, token_ids=list(o.token_ids), logprobs=[],
                          prompt_tokens=len(last.prompt_token_ids or ()),
                          finish_reason="length" if o.finish_reason == "length" else "stop")

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        out: dict[int, Completion] = dict(self.generate_iter(prompts, params, adapters))
        return [out[i] for i in range(len(prompts))]

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Sequence[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        for a in names:
            self._lora(a)  # unknown names fail before any work starts
        futures = {asyncio.run_coroutine_threadsafe(self._final(p, params, a), self.loop): i
                   for i, (p, a) in enumerate(zip(prompts, names, strict=True))}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        finally:
            for f in futures:
                f.cancel()

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        self._lora(adapter)
        items: queue.Queue[object] = queue.Queue()
        end = object()

        async def pump() -> None:
            sent = 0
            try:
                async for out in self._outputs(prompt, params, adapter):
                    text = out.outputs[0].text  # cumulative
                    if len(text) > sent:
                        items.put(text[sent:])
                        sent = len(text)
            except BaseException as exc:
                items.put(exc)
            finally:
                items.put(end)

        task = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while (item := items.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, str)
                yield item
        finally:
            task.cancel()

    # ---- LoRA adapters ---------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        if not self.lora_enabled:
            raise BadRequestError("LoRA is off on this vLLM engine (PICE_VLLM_ENABLE_LORA)",
                                  field="adapter")
        if name in self._adapters:
            raise ConflictError(f"adapter {name!r} is already loaded", field="name")
        cfg = _read_config(name, Path(path))  # InvalidAdapterError naming the problem
        rank, alpha, rslora, targets = _check_config(name, cfg, self.max_lora_rank)
        weights = Path(path) / WEIGHTS_FILE  # safetensors only: vLLM would accept a pickle
        if not weights.is_file():
            raise BadRequestError(f"adapter {name!r}: {WEIGHTS_FILE} is missing", field="path")
        info = AdapterInfo(name=name, rank=rank, alpha=alpha, use_rslora=rslora,
                           target_modules=sorted(targets), size_bytes=weights.stat().st_size,
                           tier="disk", base_model=cfg.get("base_model_name_or_path"))
        self._adapters[name] = (next(self._ids), Path(path), info)
        return info

    def remove_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise NotFoundError(f"adapter {name!r} is not loaded", field="adapter")

    def adapters(self) -> list[AdapterInfo]:
        return [info for _, _, info in self._adapters.values()]

    def resident_adapters(self) -> set[str]:
        return set(self._adapters)

