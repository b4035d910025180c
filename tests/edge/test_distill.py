"""`pice train expander` end to end on tiny models: the teacher sketches and expands, the LoRA
trains on the CPU, resumes from its checkpoint, and the saved PEFT adapter changes the student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pice.cli import main
from pice.cloud.sketcher import parse_sketch, sketch_messages
from pice.edge.distill.data import load_questions, usable
from pice.edge.expander import assistant_prefix, expansion_messages
from pice.shared.config import ServeSettings
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionTask
from tests.conftest import SKETCH_QUESTIONS
from tests.factories import SKETCH_ANSWER, teach

EXPANSION = "Keep the same bedtime every night."




@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model taught to sketch the test questions and to expand every point."""
    d = tmp_path_factory.mktemp("teacher")
    shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    gen = HFGenerator(str(d))
    defaults = ServeSettings()
    points = parse_sketch(SKETCH_ANSWER, defaults.default_max_points)
    pairs = [(gen.render_chat(sketch_messages(q, defaults.default_max_points,
                                              defaults.words_per_point)), SKETCH_ANSWER)
             for q in SKETCH_QUESTIONS]
    pairs += [(gen.render_chat(expansion_messages(t), assistant_prefix(t)), EXPANSION)
              for q in SKETCH_QUESTIONS for t in
              (ExpansionTask(request_id="x", question=q, sketch=points, index=i, max_tokens=8)
               for i in range(len(points)))]
    teach(d, pairs)
    return d


def test_train_expander_end_to_end_and_resume(teacher_dir: Path, tiny_model_dir: Path,
                                              tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n"
                                 for i, q in enumerate(SKETCH_QUESTIONS)))
    out = tmp_path / "adapter"
    common = ["train", "expander", "--cloud-model", str(teacher_dir), "--edge-model",
              str(tiny_model_dir), "--questions", str(questions), "--out", str(out),
              "--cache-dir", str(tmp_path / "cache"), "--checkpoint-every", "2",
              "--max-seq-len", "256", "--lr", "0.01", "--rank", "4"]
    assert main([*common, "--steps", "2"]) == 0
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    for r in rows:
        assert len(r["sketch"]) == 3 and len(r["expansions"]) == 3
        assert r["expansions"].count(EXPANSION) >= 2  # the teacher's own text is the target
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2

    # more steps, resumed: data is not regenerated, training continues from step 2
    mtime = (out / "pairs.jsonl").stat().st_mtime
    assert main([*common, "--steps", "6", "--resume"]) == 0
    assert (out / "pairs.jsonl").stat().st_mtime == mtime
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 6 and report["examples"] >= 4
    assert len(json.loads((out / "checkpoint" / "state.json").read_text())["losses"]) == 6
    assert report["loss_last"] < report["loss_first"]

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
