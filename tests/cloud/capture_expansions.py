"""Capture real expansions from the packaged edge models into `data/real_expansions.json`, the
fixture the garbage tests replay (run once by hand, under the heavy lock; not a test):

    flock /tmp/pice-heavy.lock .venv/bin/python -m tests.cloud.capture_expansions

Sketches are those the packaged cloud model wrote in `bench/results/quality.json` (plus the
README's remote-work question); each point is expanded by every default edge source (qwen 0.5B,
the same with the shipped adapter, gemma 270M) twice: with the prompt and stop rules from before
issue 15 ("legacy") and with the current ones. Raw model text is stored, before any cleaning."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pice.edge.distill import EXPANDER_ADAPTER, shipped_adapter
from pice.edge.expander import STOPS, assistant_prefix, expansion_messages, is_base_model
from pice.runtime import load_generator
from pice.shared.config import ServeSettings
from pice.shared.protocol import ExpansionTask
from pice.shared.sampling import SamplingParams

OUT = Path(__file__).parent / "data" / "real_expansions.json"
SKETCHES = {
    "How can I improve the quality of my sleep?": [
        "Establish a consistent sleep schedule", "Create a relaxing bedtime routine",
        "Avoid caffeine and electronics before bedtime", "Use a comfortable mattress and pillows",
        "Exercise regularly"],
    "What were the main causes of World War I?": [
        "Economic differences", "Political instability", "Military alliances",
        "Lack of communication"],
    "What clues might tell you that a restaurant is popular with locals rather than tourists?": [
        "High foot traffic", "Local menu options", "Unique ambiance",
        "Local reviews and recommendations"],
    "What would happen if humans no longer needed to sleep?": [
        "Increased physical activity", "Potential for increased lifespan",
        "Changes in social behavior", "Potential for increased mental health"],
    ("As an experienced mountain guide, what advice would you give a first-time hiker planning "
     "a day trek?"): [
        "Plan your route carefully", "Bring necessary gear", "Stay hydrated and well-fed",
        "Respect the environment", "Stay alert and prepared"],
    "How does a refrigerator keep food cold?": [
        "Insulation", "Refrigerator temperature", "Air circulation"],
    "What are the pros and cons of renting versus buying a home?": [
        "Cost-effective", "Flexibility", "No down payment required", "No maintenance costs",
        "Limited ownership rights"],
    "What are good habits for remote work?": [
        "Set up a dedicated workspace", "Prioritize tasks", "Use productivity tools",
        "Take breaks", "Stay organized"],
}
# The expansion prompt and stops before issue 15 (a numbered outline, "\n" the only stop): the
# setting that produced the garbage sections the issue reports.
_LEGACY_SYSTEM = ("You are helping write an answer whose outline is already fixed. You write the "
                  "text of exactly one point of the outline: one or two informative sentences of "
                  "plain prose about that point and only that point. No lists, no numbering, no "
                  "headings.")
_LEGACY_REPLY = ("Wake up at a fixed time: Getting up at the same time every day, weekends "
                 "included, sets your body clock so that waking up feels easier.")


def _legacy_ask(t: ExpansionTask) -> str:
    outline = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(t.sketch))
    return (f"Question: {t.question}\n\nOutline:\n{outline}\n\nWrite point {t.index + 1} "
            f"(\"{t.sketch[t.index]}\") in one or two sentences. Do not write any other point.")


def legacy_messages(t: ExpansionTask, few_shot: bool) -> list[dict[str, str]]:
    example = ExpansionTask(request_id="example", question="How can I make my mornings less "
                            "rushed?", sketch=["Prepare everything the night before",
                                               "Wake up at a fixed time", "Keep breakfast simple"],
                            index=1, max_tokens=1)
    shot = [{"role": "user", "content": _legacy_ask(example)},
            {"role": "assistant", "content": _LEGACY_REPLY}] if few_shot else []
    return [{"role": "system", "content": _LEGACY_SYSTEM}, *shot,
            {"role": "user", "content": _legacy_ask(t)}]


Messages = Callable[[ExpansionTask, bool], list[dict[str, str]]]
PROMPTS: dict[str, tuple[Messages, tuple[str, ...]]] = {
    "legacy": (legacy_messages, ("\n",)), "current": (expansion_messages, STOPS)}
SOURCES = [("qwen2.5-coder-0.5b-instruct", None),
           ("qwen2.5-coder-0.5b-instruct", EXPANDER_ADAPTER),
           ("gemma-3-270m", None)]


def main() -> int:
    settings = ServeSettings()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    rows = []
    gens = {}
    for spec, adapter in SOURCES:
        if spec not in gens:
            gens[spec] = load_generator(spec, settings, progress=False)
            path = shipped_adapter(spec)
            if path is not None:
                gens[spec].add_adapter(EXPANDER_ADAPTER, path)
        gen = gens[spec]
        tasks = [ExpansionTask(request_id="capture", question=q, sketch=pts, index=i,
                               max_tokens=64)
                 for q, pts in SKETCHES.items() for i in range(len(pts))]
        few = is_base_model(gen)
        for prompt_name, (messages, stops) in PROMPTS.items():
            prompts = [gen.render_chat(messages(t, few), assistant_prefix(t)) for t in tasks]
            t0 = time.perf_counter()
            outs = gen.generate(prompts, SamplingParams(max_tokens=64, stop=stops),
                                [adapter] * len(tasks))
            print(f"{spec}+{adapter} {prompt_name}: {len(tasks)} points in "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
            for t, o in zip(tasks, outs, strict=True):
                rows.append({"model": spec, "adapter": adapter, "prompt": prompt_name,
                             "question": t.question, "sketch": t.sketch, "index": t.index,
                             "raw": o.text, "finish_reason": o.finish_reason,
                             "tokens": o.completion_tokens, "mean_logprob": o.mean_logprob})
    OUT.write_text(json.dumps({"commit": commit, "max_tokens": 64, "rows": rows}, indent=1)
                   + "\n")
    print(f"wrote {len(rows)} expansions to {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
