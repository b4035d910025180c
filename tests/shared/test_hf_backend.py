import pytest

from pice.shared.errors import BadRequestError, ContextLengthError
from pice.shared.hf_backend import HFGenerator
from pice.shared.sampling import SamplingParams

PROMPTS = ["The quick brown fox", "Water boils at", "How can I sleep better at night? Keep"]


def test_batch_equals_one_by_one(tiny_generator: HFGenerator) -> None:
    params = SamplingParams(max_tokens=12)
    batched = tiny_generator.generate(PROMPTS, params)
    single = [tiny_generator.generate([p], params)[0] for p in PROMPTS]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    for b, s in zip(batched, single, strict=True):
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)
        assert b.prompt_tokens == s.prompt_tokens


def test_logprobs_match_a_forward_pass(tiny_generator: HFGenerator) -> None:
    import torch

    [out] = tiny_generator.generate([PROMPTS[0]], SamplingParams(max_tokens=6))
    tok = tiny_generator.tokenizer
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"] + out.token_ids
    with torch.no_grad():
        logits = tiny_generator.model(torch.tensor([ids])).logits[0]  # [seq, vocab]
    logp = logits.log_softmax(-1)
    n = len(out.token_ids)
    expected = [logp[len(ids) - n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)
    assert all(lp <= 0 for lp in out.logprobs)
    # greedy: each chosen token is the argmax of its step
    assert out.token_ids == [int(logits[len(ids) - n - 1 + i].argmax()) for i in range(n)]


def test_stream_matches_generate(tiny_generator: HFGenerator) -> None:
    params = SamplingParams(max_tokens=10)
    [out] = tiny_generator.generate([PROMPTS[1]], params)
    assert "".join(tiny_generator.stream(PROMPTS[1], params)) == out.text


def test_seeded_sampling_is_reproducible(tiny_generator: HFGenerator) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    a = tiny_generator.generate(PROMPTS, params)
    b = tiny_generator.generate(PROMPTS, params)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]


def test_context_limit_is_enforced(tiny_generator: HFGenerator) -> None:
    with pytest.raises(ContextLengthError, match="exceeds the context limit of 1024"):
        tiny_generator.generate(["word " * 1100], SamplingParams(max_tokens=4))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"),
])
def test_bad_sampling_params_name_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(BadRequestError) as err:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_chat_template_is_applied(tiny_generator: HFGenerator) -> None:
    text = tiny_generator.render_chat([{"role": "user", "content": "hi"}], "1.")
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n1."


def test_vanishing_temperature_decodes_instead_of_raising(tiny_generator: HFGenerator) -> None:
    """temperature 1e-45 passes validation; logits / T would overflow to NaN."""
    tiny = SamplingParams(max_tokens=4, temperature=1e-45, seed=1)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    out = tiny_generator.generate(["Water boils at"], tiny)[0]
    assert out.token_ids == tiny_generator.generate(["Water boils at"], greedy)[0].token_ids
