"""A whole edge group behind the `TextGenerator` interface, on its first stage: the edge agent's
EdgeWorker expands points with it as with any local model. Base model only (no LoRA adapters)."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

from pice.edge.group.driver import GroupSeq
from pice.edge.group.node import StageNode
from pice.shared.backend import ChatBackedGenerator
from pice.shared.engine.generator import _generation_eos
from pice.shared.errors import BadRequestError, NotFoundError, PiceError
from pice.shared.lora.adapter import AdapterInfo
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer, trim_at_stop


class GroupUnavailableError(PiceError):
    """The group could not finish a request (it left the pool, or this member is no longer its
    first stage); the pool moves the point elsewhere."""

    status_code = 503


class GroupGenerator(ChatBackedGenerator):
    def __init__(self, name: str, path: str | Path, max_context: int) -> None:
        self.name = name
        self.chat = ChatTokenizer(str(path), max_context, _generation_eos(str(path)))
        self.node: StageNode | None = None  # set once the stage node exists

    def _submit(self, prompt: str, params: SamplingParams,
                done: queue.Queue[int] | None, i: int) -> GroupSeq:
        if self.node is None:
            raise GroupUnavailableError("the group's stage is not running")
        ids = self.chat.encode(prompt)
        self.chat.check_fits(len(ids), params.max_tokens)
        # min_tokens holds back EOS: the first stage flags each record still under it and the
        # last stage masks its EOS ids for those; stop_token_ids are not carried to the last
        # stage, so one of them still ends a sequence early
        on_done = (lambda _s: done.put(i)) if done is not None else None
        try:
            return self.node.submit(ids, params, on_done)
        except RuntimeError as exc:
            raise GroupUnavailableError(str(exc)) from None

    def _completion(self, seq: GroupSeq) -> Completion:
        if seq.error is not None:
            raise GroupUnavailableError(seq.error)
        ids = seq.completion_ids
        if ids and ids[-1] in self.chat.eos_ids:
            ids = ids[:-1]
        text, _ = trim_at_stop(self.chat.decode(ids), seq.params.stop)
        return Completion(text=text, token_ids=seq.completion_ids, logprobs=list(seq.logprobs),
                          prompt_tokens=seq.num_prompt, finish_reason=seq.finish_reason or "stop",
                          extra={"replays": seq.replays})

    @staticmethod
    def _no_adapters(adapters: Seq[str | None] | None) -> None:
        if adapters is not None and any(a is not None for a in adapters):
            raise BadRequestError("edge groups serve the base model only", field="adapter")

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Seq[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        self._no_adapters(adapters)
        done: queue.Queue[int] = queue.Queue()
        seqs = [self._submit(p, params, done, i) for i, p in enumerate(prompts)]
        finished = 0
        try:
            while finished < len(seqs):
                i = done.get()
                finished += 1
                yield i, self._completion(seqs[i])
        finally:
            if self.node is not None:
                for s in seqs:
                    if not s.done.is_set():
                        self.node.abort(s)

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Seq[str | None] | None = None) -> list[Completion]:
        out = dict(self.generate_iter(prompts, params, adapters))
        return [out[i] for i in range(len(prompts))]

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        [completion] = self.generate([prompt], params, [adapter])
        yield completion.text

    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        raise BadRequestError("edge groups serve the base model only", field="adapter")

    def remove_adapter(self, name: str) -> None:
        raise NotFoundError(f"adapter {name!r} is not loaded on this edge group")

    def adapters(self) -> list[AdapterInfo]:
        return []

    def resident_adapters(self) -> set[str]:
        return set()
