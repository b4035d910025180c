"""First generation backend: transformers `generate` on CPU (or CUDA when present).

All prompts passed to `generate` run as one left-padded batch, so the expansions of one answer
cost one batched decode, not one decode per point."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, TextIteratorStreamer

from pice.shared.backend import ChatBackedGenerator
from pice.shared.errors import BadRequestError, NotFoundError
from pice.shared.lora.adapter import AdapterInfo
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer, trim_at_stop


class HFGenerator(ChatBackedGenerator):
    """A causal LM from transformers behind the `TextGenerator` interface. Thread-safe: one
    generation runs at a time per model (the lock), callers batch to share it."""

    def __init__(self, path: str, *, name: str | None = None, max_context: int = 4096,
                 device: str | None = None) -> None:
        self.name = name or path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stub
        cfg_ctx = int(getattr(self.model.config, "max_position_embeddings", max_context))
        self.chat = ChatTokenizer(path, min(max_context, cfg_ctx),
                                  self.model.generation_config.eos_token_id)
        self.tokenizer = self.chat.tok
        self._eos_ids = self.chat.eos_ids
        self._lock = threading.Lock()

    # ---- generation ----------------------------------------------------------------------------
    @staticmethod
    def _samples(params: SamplingParams) -> bool:
        # a vanishing temperature (1e-45 passes validation) would overflow transformers'
        # logits / T into NaN; below 1e-4 sampling is argmax anyway, so decode greedily
        return not params.greedy and params.temperature >= 1e-4

    def _generate_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": sorted(self._eos_ids | set(params.stop_token_ids)),
            "do_sample": self._samples(params),
        }
        if self._samples(params):
            kw.update(temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k or None)
        else:  # silence sampling defaults a generation_config may carry
            kw.update(temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            kw.update(min_new_tokens=params.max_tokens)
        elif params.min_tokens:  # transformers masks eos_token_id (stop ids included) as well
            kw.update(min_new_tokens=params.min_tokens)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kw

    def _encode(self, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        for n in lengths:
            self.check_fits(int(n), max_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}

    # ---- adapters: not served by this backend -------------------------------------------------
    def _refuse(self) -> BadRequestError:
        return BadRequestError("the hf backend does not serve LoRA adapters; run with "
                               "backend=engine", field="adapter")

    def _check_no_adapters(self, adapters: Sequence[str | None] | None) -> None:
        named = sorted({a for a in adapters or () if a is not None})
        if named:
            raise NotFoundError(f"adapter {named[0]!r} does not exist (the hf backend serves "
                                "no LoRA adapters; run with backend=engine)", field="adapter")

    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        raise self._refuse()

    def remove_adapter(self, name: str) -> None:
        raise NotFoundError(f"adapter {name!r} does not exist", field="adapter")

    def adapters(self) -> list[AdapterInfo]:
        return []

    def resident_adapters(self) -> set[str]:
        return set()

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        self._check_no_adapters(adapters)
        if not prompts:
            return []
        enc = self._encode(prompts, params.max_tokens)
        with self._lock:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(**enc, **self._generate_kwargs(params),
                                      return_dict_in_generate=True, output_logits=True)
        prompt_len = enc["input_ids"].shape[1]
        gen = out.sequences[:, prompt_len:].cpu()  # gen: [batch, new_tokens]
        # logps: [batch, new_tokens, vocab] → chosen-token log-probs [batch, new_tokens]
        logps = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()
        chosen = logps.gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        results = []
        ends = self._eos_ids | set(params.stop_token_ids)
        for row in range(gen.shape[0]):
            ids = gen[row].tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in ends), len(ids))
            hit_eos = bool(ids) and ids[n - 1] in ends
            keep = ids[: n - 1] if hit_eos else ids[:n]
            text = str(self.tokenizer.decode(keep, skip_special_tokens=True))
            text, hit_stop = trim_at_stop(text, params.stop)
            results.append(Completion(
                text=text,
                token_ids=ids[:n],
                logprobs=chosen[row, :n].tolist(),
                prompt_tokens=int(enc["attention_mask"][row].sum()),
                finish_reason="stop" if hit_eos or hit_stop else "length",
            ))
        return results

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Sequence[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        self._check_no_adapters(adapters)
        yield from enumerate(self.generate(prompts, params))  # one padded batch ends together

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        self._check_no_adapters([adapter])
        enc = self._encode([prompt], params.max_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    self.model.generate(**enc, **self._generate_kwargs(params), streamer=streamer)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        emitted = ""
        for delta in streamer:
            candidate = emitted + delta
            trimmed, hit = trim_at_stop(candidate, params.stop)
            if trimmed[len(emitted):]:
                yield trimmed[len(emitted):]
            emitted = trimmed
            if hit:
                break
        thread.join()
        if errors:
            raise errors[0]
