"""The engine behind the `TextGenerator` interface: a loop thread steps the engine while any
request is in flight, so concurrent callers (a stream, a sketch, a batch of expansions) share
every step: continuous batching."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from pice.shared.backend import ChatBackedGenerator
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.llm_engine import LLMEngine
from pice.shared.engine.models import model_class
from pice.shared.engine.sequence import Sequence
from pice.shared.errors import BadRequestError
from pice.shared.lora.adapter import AdapterInfo
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer, trim_at_stop

log = logging.getLogger(__name__)


class _Handle:
    def __init__(self, seq: Sequence, on_done: Callable[[], None] | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.seq = seq
        self.updates: queue.Queue[BaseException | None] = queue.Queue()  # None → progress
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.on_done = on_done
        self.release = release  # runs once when it finishes (drops its adapter use)

    def notify(self) -> None:
        if self.seq.is_finished:
            self._finish()
        self.updates.put(None)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._finish()
        self.updates.put(exc)

    def _finish(self) -> None:
        if self.done.is_set():
            return
        if self.release is not None:
            self.release()
        self.done.set()
        if self.on_done is not None:
            self.on_done()


def _generation_eos(path: str) -> Any:
    cfg = Path(path) / "generation_config.json"
    return json.loads(cfg.read_text()).get("eos_token_id") if cfg.exists() else None


class EngineGenerator(ChatBackedGenerator):
    def __init__(self, path: str, *, name: str | None = None, max_context: int = 4096,
                 **engine_options: Any) -> None:
        self.name = name or path
        model_class(path)  # an unsupported architecture is refused before anything loads
        cfg = EngineConfig(model=path, max_model_len=max_context,
                           max_num_batched_tokens=max(4096, max_context), **engine_options)
        self.chat = ChatTokenizer(path, max_context, _generation_eos(path))
        self.engine = LLMEngine(cfg, self.chat.eos_ids, self.chat.decode)
        self.chat.max_context = self.engine.max_model_len
        self._inbox: queue.Queue[_Handle] = queue.Queue()
        self._aborts: queue.Queue[_Handle] = queue.Queue()
        self._live: dict[int, _Handle] = {}
        threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True).start()

    # ---- the loop thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if not self.engine.has_work:
                self._admit(self._inbox.get())  # idle: block until a request arrives
            while not self._inbox.empty():
                self._admit(self._inbox.get_nowait())
            while not self._aborts.empty():
                handle = self._aborts.get_nowait()
                if self._live.pop(handle.seq.seq_id, None) is not None:
                    self.engine.abort(handle.seq)
                    handle.notify()
            try:
                stepped = self.engine.step()
            except Exception as exc:  # fail what was in flight, keep serving
                log.exception("engine step failed")
                for handle in [h for h in self._live.values() if h.seq.is_finished]:
                    self._live.pop(handle.seq.seq_id)
                    handle.fail(exc)
                continue
            for seq in stepped:
                handle = self._live[seq.seq_id]
                if seq.error is not None:  # failed before running (its adapter's file)
                    handle.fail(seq.error)
                else:
                    handle.notify()
                if seq.is_finished:
                    del self._live[seq.seq_id]

    def _admit(self, handle: _Handle) -> None:
        self._live[handle.seq.seq_id] = handle
        self.engine.add(handle.seq)

    # ---- adapters (LoRA) -----------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        """Validate a PEFT adapter directory (InvalidAdapterError naming the problem) and
        register it on the disk tier; it loads into a device slot when a request needs it.
        A taken name raises ConflictError."""
        return self.engine.pool.add(name, Path(path))

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter from every tier, returning its memory. Refused with ConflictError
        (409) while any request naming it is queued or running; NotFoundError if unknown."""
        self.engine.pool.remove(name)

    def adapters(self) -> list[AdapterInfo]:
        return self.engine.pool.infos()

    def resident_adapters(self) -> set[str]:
        """Names of the adapters in device slots now."""
        return self.engine.pool.resident()

    def _check_adapters(self, names: Seq[str | None] | None, n: int) -> list[str | None]:
        if names is None:
            return [None] * n
        names = list(names)
        if len(names) != n:
            raise BadRequestError(f"{len(names)} adapters given for {n} prompts",
                                  field="adapter")
        for name in set(names):
            if name is not None:
                self.engine.pool.info(name)  # NotFoundError before anything runs
        return names

    # ---- callers' side ------------------------------------------------------------------------
    def submit(self, prompt: str, params: SamplingParams,
               on_done: Callable[[], None] | None = None,
               adapter: str | None = None) -> _Handle:
        ids = self.chat.encode(prompt)
        self.chat.check_fits(len(ids), params.max_tokens)
        seq = self.engine.make_sequence(ids, params, adapter)  # admission errors raise here
        handle = _Handle(seq, on_done, release=lambda: self.engine.release(seq))
        self._inbox.put(handle)
        return handle

    def _text(self, seq: Sequence) -> tuple[str, bool]:
        ids = seq.completion_ids
        if ids and ids[-1] in self.chat.eos_ids:
            ids = ids[:-1]
        return trim_at_stop(self.chat.decode(ids), seq.params.stop)

    def _completion(self, handle: _Handle) -> Completion:
        if handle.error is not None:
            raise handle.error
        seq = handle.seq
        extra: dict[str, object] = {"top_logprobs": list(seq.top_logprobs)} \
            if seq.params.top_logprobs else {}
        return Completion(text=self._text(seq)[0], token_ids=seq.completion_ids,
                          logprobs=list(seq.logprobs), prompt_tokens=seq.num_prompt_tokens,
                          finish_reason=seq.finish_reason or "stop", extra=extra)

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Seq[str | None] | None = None) -> list[Completion]:
        names = self._check_adapters(adapters, len(prompts))
        handles = [self.submit(p, params, adapter=a) for p, a in zip(prompts, names, strict=True)]
        for h in handles:
            h.done.wait()
        return [self._completion(h) for h in handles]

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Seq[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        """(index, completion) as each finishes; a sequence that failed is skipped and its
        error raised once every other one has been yielded."""
        names = self._check_adapters(adapters, len(prompts))
        finished: queue.Queue[int] = queue.Queue()
        handles = [self.submit(p, params, on_done=lambda i=i: finished.put(i),  # type: ignore[misc]
                               adapter=names[i])
                   for i, p in enumerate(prompts)]
        failed: list[BaseException] = []
        for _ in handles:
            i = finished.get()
            error = handles[i].error
            if error is not None:  # one sequence's fault: the others are still delivered
                failed.append(error)
                continue
            yield i, self._completion(handles[i])
        if failed:
            raise failed[0]

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        """Text deltas; closing the iterator early (client gone) aborts the sequence."""
        self._check_adapters([adapter], 1)
        handle = self.submit(prompt, params, adapter=adapter)
        emitted = ""
        try:
            while True:
                update = handle.updates.get()
                if isinstance(update, BaseException):
                    raise update
                text, _ = self._text(handle.seq)
                if not text.endswith("\ufffd") and len(text) > len(emitted):  # whole chars only
                    yield text[len(emitted):]
                    emitted = text
                if handle.done.is_set() and handle.updates.empty():
                    return
        finally:
            if not handle.done.is_set():  # the loop is busy with it, so it sees this soon
                self._aborts.put(handle)
