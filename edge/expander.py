"""Point expansion on an edge worker: every point of a sketch becomes one prompt, and the prompts
of one answer run as ONE batched generation (semantic-level parallelism)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from pice.shared.backend import TextGenerator
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.sampling import SamplingParams

_SYSTEM = ("You are helping write an answer whose outline is already fixed. You write the text "
           "of exactly one point of the outline: one short paragraph of two or three full "
           "sentences that explain that point (what it means, and how or why it matters for the "
           "question), and only that point. Write plain prose: do not repeat the point's title, "
           "do not number the sentences, do not make a list.")


def _ask(task: ExpansionTask) -> str:
    # the outline as a semicolon-separated line, not a numbered list: a numbered list invites
    # small models to continue it ("… tasks 2. Use productivity tools 3. …"). "Explain … in two
    # sentences" made the 1.5B number its two sentences, restarting at "1." with the first
    # point of the outline (the guard then had only the title left): a paragraph it writes as
    # prose.
    outline = "; ".join(task.sketch)
    point = task.sketch[task.index]
    return (f"Question: {task.question}\n\nOutline: {outline}\n\n"
            f"Write the paragraph for the point \"{point}\".")


# One worked example for base models (no chat template): the transcript shows the reply's shape.
_EXAMPLE = ExpansionTask(request_id="example", question="How can I make my mornings less rushed?",
                         sketch=["Prepare everything the night before", "Wake up at a fixed time",
                                 "Keep breakfast simple"], index=1, max_tokens=1)
_EXAMPLE_REPLY = ("2. Wake up at a fixed time: Getting up at the same time every day, weekends "
                  "included, sets your body clock so that waking up feels easier. Your mornings "
                  "then start on schedule instead of with a scramble.")
# Generation ends at a new line or an item marker: past them a small model writes other points.
STOPS = ("\n", *(f" {n}. " for n in range(1, 11)), *(f" {n}) " for n in range(1, 11)))
# A section may not end (EOS) before this many tokens, nor before half its budget: the distilled
# adapter ends after one sentence (29 tokens, 24.7 words on 36 points of 6 bench questions, the
# engine, 2026-12-02); held to 24 tokens it writes a second one that explains (35.6 tokens, 30.3
# words). One-sentence sections are what makes a progressive answer read as a list of claims:
# the judge's coherence of 7 full-cloud answers fell from 0.54 to 0.27 nats per token with only
# each item's first sentence kept. Stop strings still end a section.
MIN_SECTION_TOKENS = 32


def expansion_messages(task: ExpansionTask, few_shot: bool = False) -> list[dict[str, str]]:
    """The shared part (question + whole outline) comes first so that every point's prompt has
    the same prefix; only the last line differs between the points of one answer. `few_shot`
    puts one worked example first (for base models)."""
    example = [{"role": "user", "content": _ask(_EXAMPLE)},
               {"role": "assistant", "content": _EXAMPLE_REPLY}] if few_shot else []
    return [{"role": "system", "content": _SYSTEM}, *example,
            {"role": "user", "content": _ask(task)}]


def is_base_model(generator: TextGenerator) -> bool:
    """No chat template: a base model, prompted with a plain transcript (and an example)."""
    tok = getattr(getattr(generator, "chat", None), "tok", None)
    return tok is not None and not getattr(tok, "chat_template", None)


def assistant_prefix(task: ExpansionTask) -> str:
    """The reply starts with the point itself, numbered as in the answer ("3. Title: "), so the
    model continues that item rather than restarting the outline: without the number, the
    models began with "1. " and as often as not wrote the outline's first point instead."""
    return f"{task.index + 1}. {task.sketch[task.index]}: "


# Where a small model starts another item: a new numbered/bulleted line, or "… end. 2. Next"
_NEXT_POINT = re.compile(r"\n\s*(?:\d{1,2}[.)]|[-*•])\s|\s\d{1,2}[.)]\s+(?=[A-Z])")
_LEADING_NUMBER = re.compile(r"^\s*(?:\d{1,2}[.)]\s+|\d{1,2}\.\d{1,2}[.)]?\s+(?=[A-Z])|[-*•]\s+)")
# "3.1 Caffeine … 3.2 Screens …": the point's own sentences numbered under it (prose once the
# markers go)
_SUB_ITEM = re.compile(r"(?:^|(?<=\s))\d{1,2}\.\d{1,2}[.)]?\s+(?=[A-Z])")


def clean_expansion(text: str, point: str = "") -> str:
    """Keep the first paragraph of the point's own text: drop a leading "1. " (or "3.1 ") and a
    restated point title, turn sub-numbered sentences ("3.1 … 3.2 …") into prose, cut where the
    model starts the next outline item."""
    text = _LEADING_NUMBER.sub("", text.strip(), count=1)
    if point and text.lower().startswith(point.lower()):
        text = text[len(point):].lstrip(" :.-—")
    text = _SUB_ITEM.sub("", text)
    text = _NEXT_POINT.split(text, maxsplit=1)[0]
    return text.strip().split("\n\n", 1)[0].strip()


_WORDS = re.compile(r"[a-z0-9']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    w = _WORDS.findall(text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def drop_copied(text: str, example: str = _EXAMPLE_REPLY) -> str:
    """The text without the sentences copied from the worked example (a base model given one
    example sometimes repeats it under any point): a sentence whose 4-word shingles are mostly
    the example's is dropped; one that merely shares a phrase with it is kept."""
    seen = _grams(example)
    kept = []
    for sentence in _SENTENCE_END.split(text):
        mine = _grams(sentence)
        if mine and len(mine & seen) / len(mine) >= 0.5:
            continue
        kept.append(sentence)
    return " ".join(kept).strip()


class EdgeWorker:
    """An in-process edge worker: one model, batched expansion. The network agent wraps the same
    `expand` call."""

    def __init__(self, worker_id: str, generator: TextGenerator) -> None:
        self.worker_id = worker_id
        self.generator = generator
        self.inflight = 0  # tasks currently running here (the dispatcher reads it)

    def expand(self, tasks: list[ExpansionTask]) -> list[ExpansionResult]:
        return sorted(self.expand_iter(tasks), key=lambda r: r.index)

    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        """One batched generation; each point's result is yielded the moment it finishes."""
        if not tasks:
            return
        few_shot = is_base_model(self.generator)
        prompts = [self.generator.render_chat(expansion_messages(t, few_shot), assistant_prefix(t))
                   for t in tasks]
        first = tasks[0]
        params = SamplingParams(max_tokens=max(t.max_tokens for t in tasks),
                                temperature=first.temperature,
                                seed=first.seed, stop=STOPS,
                                min_tokens=min(MIN_SECTION_TOKENS,
                                               min(t.max_tokens for t in tasks) // 2))
        self.inflight += len(tasks)
        start = time.perf_counter()
        try:
            adapters = [t.adapter for t in tasks]  # None → the base model
            for i, out in self.generator.generate_iter(prompts, params, adapters):
                t = tasks[i]
                body = clean_expansion(out.text, t.sketch[t.index])
                if few_shot:
                    body = drop_copied(body)
                yield ExpansionResult(
                    request_id=t.request_id, index=t.index, candidate=t.candidate,
                    text=f"{t.sketch[t.index]}: {body}".rstrip(": "),
                    worker=self.worker_id, model=self.generator.name, adapter=t.adapter,
                    tokens=out.completion_tokens, mean_logprob=out.mean_logprob,
                    logprobs=out.logprobs, finish_reason=out.finish_reason,
                    seconds=time.perf_counter() - start,
                )
        finally:
            self.inflight -= len(tasks)
