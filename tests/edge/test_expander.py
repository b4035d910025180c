import pytest

from pice.edge.expander import (
    EdgeWorker,
    assistant_prefix,
    clean_expansion,
    drop_copied,
    expansion_messages,
)
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionTask
from pice.shared.sampling import Completion, SamplingParams

SKETCH = ["Fixed schedule", "Dark room", "No screens"]


def tasks(n: int = 3) -> list[ExpansionTask]:
    return [ExpansionTask(request_id="r1", question="How can I sleep better?", sketch=SKETCH,
                          index=i, max_tokens=8) for i in range(n)]


class CountingGenerator(HFGenerator):
    """The real tiny model, counting how many generate calls (batches) it serves."""

    calls: list[int]
    params: list[SamplingParams]

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        self.calls.append(len(prompts))
        self.params = [*getattr(self, "params", []), params]
        return super().generate(prompts, params)


def test_all_points_run_as_one_batch(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    gen = CountingGenerator(str(tiny_model_dir))
    gen.calls = []
    results = EdgeWorker("edge-0", gen).expand(tasks())
    assert gen.calls == [3]
    # a section may not end before half its budget (min_tokens; capped at MIN_SECTION_TOKENS)
    assert gen.params[0].min_tokens == 4 and gen.params[0].max_tokens == 8
    assert [r.index for r in results] == [0, 1, 2]
    for r, point in zip(results, SKETCH, strict=True):
        assert r.text.startswith(point)
        assert r.worker == "edge-0"
        assert 1 <= r.tokens <= 8
        assert len(r.logprobs) == r.tokens
        assert r.mean_logprob == pytest.approx(sum(r.logprobs) / r.tokens)


def test_prompts_share_a_prefix_and_name_their_point() -> None:
    a, b = (expansion_messages(t)[1]["content"] for t in tasks(2))
    assert a.split("Write the paragraph")[0] == b.split("Write the paragraph")[0]
    assert 'for the point "Fixed schedule"' in a
    assert 'for the point "Dark room"' in b
    assert "1." not in a and "2." not in b  # no numbered outline for the model to continue


@pytest.mark.parametrize(("raw", "clean"), [
    ("keep the same hours.\n2. Dark room: blah", "keep the same hours."),
    ("  go to bed at ten.  \n\nAnother paragraph", "go to bed at ten."),
    ("one line\n- next bullet", "one line"),
    ("a 2.5 hour nap", "a 2.5 hour nap"),
    ("1. Start with a bath. 2. Set a time for bed. 3.", "Start with a bath."),
    ("Rest 7-9 hours. It helps: 1. Mood", "Rest 7-9 hours. It helps:"),
    # the sketch echoed without punctuation before the numbers (issue 15)
    ("Prioritize tasks 2. Use productivity tools 3. Take breaks", "Prioritize tasks"),
    # the 1.5B numbering its point's own sentences under it (captured, "Avoid caffeine and
    # electronics before bedtime"): prose once the markers go; a number in prose stays
    ("3.1 Caffeine can disrupt sleep patterns and make it harder to fall asleep. 3.2 Excessive "
     "use of electronics, such as smartphones and tablets, can also interfere with sleep "
     "quality.", "Caffeine can disrupt sleep patterns and make it harder to fall asleep. "
     "Excessive use of electronics, such as smartphones and tablets, can also interfere with "
     "sleep quality."),
    ("3.5 million people moved.", "3.5 million people moved."),
    ("30 minutes before bedtime.", "30 minutes before bedtime."),
])
def test_clean_expansion(raw: str, clean: str) -> None:
    assert clean_expansion(raw) == clean


def test_the_reply_continues_its_own_numbered_item() -> None:
    t = tasks(3)[2]
    assert assistant_prefix(t) == f"3. {t.sketch[2]}: "


def test_clean_expansion_drops_a_restated_point() -> None:
    assert clean_expansion("Dark room: keep it dark.", "Dark room") == "keep it dark."
    assert clean_expansion("Keep it dark.", "Dark room") == "Keep it dark."


# gemma-3-270m's real replies (captured from the packaged model on "What are good habits for
# remote work?"): under "Take breaks" and "Stay organized" it repeated its worked example.
COPIED = ("Getting up at the same time every day, weekends included, sets your body clock so that "
          "waking up feels easier. Your mornings then start on schedule instead of with a "
          "scramble.")


@pytest.mark.parametrize(("raw", "kept"), [
    (COPIED, ""),
    ("Short pauses restore focus. " + COPIED, "Short pauses restore focus."),
    # sharing a phrase with the example is no copy
    ("Go to bed and get up at the same time every day. A steady rhythm deepens sleep.",
     "Go to bed and get up at the same time every day. A steady rhythm deepens sleep."),
])
def test_sentences_copied_from_the_worked_example_are_dropped(raw: str, kept: str) -> None:
    assert drop_copied(raw) == kept
