"""`pice train expander` end to end on tiny models: the teacher sketches and expands, the LoRA
trains on the CPU, resumes from its checkpoint exactly, and the saved PEFT adapter changes the
student.

Nothing here rests on how briefly trained weights land (a teacher taught for a few seconds
answers differently on another CPU): the data stage is checked against the rules it must keep
whatever the teacher says, and the training stage trains on teacher data fixed by construction
(a pairs file the test writes), checked on its mechanics: which pairs become examples, that a
resumed run replays the uninterrupted one loss for loss, and that the adapter loads and acts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pice.cli import main
from pice.edge.distill.data import load_questions, usable
from pice.edge.expander import expansion_messages
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionTask
from tests.conftest import SKETCH_QUESTIONS

EXPANSION = "Keep the same bedtime every night."
SKETCH = ["Fixed sleep schedule", "Dark quiet bedroom", "No screens late"]
# teacher data by construction: 2 questions x 3 points, one point the teacher left unusable
PAIRS = [{"id": f"q{i}", "question": q, "sketch": SKETCH,
          "expansions": [EXPANSION, None if i == 1 else "Make the room dark and cool.",
                         "Put the phone away an hour before bed."]}
         for i, q in enumerate(SKETCH_QUESTIONS)]


def questions_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                            for i, q in enumerate(SKETCH_QUESTIONS)))
    return path


def command(tiny_model_dir: Path, tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "expander", "--cloud-model", str(tiny_model_dir), "--edge-model",
            str(tiny_model_dir), "--questions", str(questions_file(tmp_path)), "--out",
            str(out), "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "2",
            "--max-seq-len", "256", "--lr", "0.01", "--rank", "4", *extra]


def test_teacher_data_keeps_its_rules_whatever_the_teacher_says(
        sketch_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever the teacher (here the briefly taught sketcher) says: one line per question, an
    expansion slot per sketch point, only usable text kept, and a second run regenerates
    nothing."""
    out = tmp_path / "adapter"
    assert main(command(sketch_model_dir, tmp_path, out, "--stage", "data")) == 0
    assert json.loads(capsys.readouterr().out)["data"]["questions_written"] == 2
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    assert [r["question"] for r in rows] == SKETCH_QUESTIONS
    for r in rows:
        assert all(isinstance(p, str) and p.strip() for p in r["sketch"])
        assert len(r["expansions"]) == len(r["sketch"])
        assert all(e is None or usable(e, "stop") for e in r["expansions"])
    before = (out / "pairs.jsonl").read_bytes()
    assert main(command(sketch_model_dir, tmp_path, out, "--stage", "data")) == 0
    assert json.loads(capsys.readouterr().out)["data"]["questions_written"] == 0
    assert (out / "pairs.jsonl").read_bytes() == before


def train(tiny_model_dir: Path, tmp_path: Path, out: Path, steps: int, *extra: str) -> None:
    assert main(command(tiny_model_dir, tmp_path, out, "--steps", str(steps), *extra)) == 0


def test_train_expander_end_to_end_and_resume(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, straight = tmp_path / "adapter", tmp_path / "straight"
    for d in (out, straight):  # the teacher's data is complete: the data stage adds nothing
        d.mkdir()
        (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    train(tiny_model_dir, tmp_path, out, 2)
    first = json.loads((out / "checkpoint" / "state.json").read_text())
    assert first["step"] == 2 and len(first["losses"]) == 2

    # more steps, resumed: data is not regenerated, training continues from step 2 ...
    train(tiny_model_dir, tmp_path, out, 6, "--resume")
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 6 and report["examples"] == 5  # the unusable point is skipped
    losses = json.loads((out / "checkpoint" / "state.json").read_text())["losses"]
    assert len(losses) == 6 and losses[:2] == first["losses"]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    # ... exactly where an uninterrupted run of 6 steps goes
    train(tiny_model_dir, tmp_path, straight, 6)
    again = json.loads((straight / "checkpoint" / "state.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(again), rtol=1e-4, atol=1e-5)

    # a PEFT adapter: config + safetensors, loads in peft, changes the student's outputs
    from peft import PeftModel

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 9, 88, 31]])  # [1, 6]
    with torch.no_grad():
        before = base(input_ids=ids).logits  # [1, 6, vocab]
        tuned = PeftModel.from_pretrained(base, str(out)).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_usable_targets_and_bad_question_files(tmp_path: Path) -> None:
    assert usable("Sleep well.", "length") and usable("Sleep well", "stop")
    assert not usable("Sleep well and", "length") and not usable("  ", "stop")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "a", "question": ""}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:1"):
        load_questions(bad)


def test_bad_settings_are_refused_with_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "expander", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


def test_base_models_get_a_worked_example(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model without a chat template (gemma-3-270m) sees one example exchange first."""
    from pice.edge.expander import EdgeWorker, is_base_model

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    cfg = json.loads((base_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in base_dir.glob("chat_template.*"):
        f.unlink()
    base, chat = HFGenerator(str(base_dir)), HFGenerator(str(tiny_model_dir))
    assert is_base_model(base) and not is_base_model(chat)
    task = ExpansionTask(request_id="r", question="How can I sleep better?",
                         sketch=["Fixed schedule", "Dark room"], index=1, max_tokens=4)
    assert len(expansion_messages(task, few_shot=True)) == len(expansion_messages(task)) + 2
    [r] = EdgeWorker("e", base).expand([task])  # the plain transcript runs end to end
    assert r.text.startswith("Dark room")
