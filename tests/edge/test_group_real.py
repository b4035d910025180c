"""The packaged 0.5B model as a 2-stage edge group of processes on loopback: greedy tokens equal
the single-process engine's (marked real_model: loads the model three times)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pice.shared.models import DEFAULT_EDGE_MODEL
from pice.shared.models.resolve import resolve_model
from tests.edge.group_procs import StageProc, configure
from tests.edge.test_group_exact import engine_tokens

pytestmark = pytest.mark.real_model

QUESTIONS = ["How can I sleep better at night?", "Explain what a hash map is.",
             "Give three tips for writing clear emails."]


def test_packaged_model_split_in_two_matches_the_engine(tmp_path: Path) -> None:
    model = Path(resolve_model(DEFAULT_EDGE_MODEL).path)
    tok = AutoTokenizer.from_pretrained(model)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in QUESTIONS]
    batch = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    want = engine_tokens(model, batch, 24)
    stages = [StageProc(tmp_path, f"s{i}") for i in range(2)]
    try:
        configure(stages, model, [(0, 12), (12, 24)], epoch=1, num_blocks=128)
        stages[0].generate(batch, 24)
        got = stages[0].results(len(batch), timeout=600)
        assert [got[str(i)]["tokens"] for i in range(len(batch))] == want
    finally:
        for s in stages:
            s.kill()
