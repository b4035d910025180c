"""Factories for tests: tiny seeded models (a few MB) with a real byte-level BPE tokenizer and a
chat template, and a tiny model trained for a few seconds to write an outline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "How can I sleep better at night? Keep a fixed schedule, avoid screens, cool dark room.",
    "1. Prepare everything the night before\n2. Wake up at a fixed time\n3. Keep breakfast simple",
    "You plan answers. Reply with an outline only: a numbered list of the main points.",
    "Question: Outline: Write point in one or two sentences. Do not write any other point.",
    "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees Celsius.",
]
SKETCH_ANSWER = "1. Fixed sleep schedule\n2. Dark quiet bedroom\n3. No screens late"


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """A random-weight Qwen2 (2 layers, hidden 64) with the tiny tokenizer, saved as an HF dir."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def train_to_sketch(model_dir: Path, prompts: list[str], answer: str = SKETCH_ANSWER,
                    steps: int = 80, seed: int = 0) -> Path:
    """Teach the tiny model to answer every given sketch prompt with `answer` (a few seconds of
    Adam on CPU), so tests exercise a real sketch → parse → expand path."""
    return teach(model_dir, [(p, answer) for p in prompts], steps, seed)


def teach(model_dir: Path, pairs: list[tuple[str, str]], steps: int = 400,
          seed: int = 0, max_rounds: int = 10) -> Path:
    """Adam until the tiny model answers each prompt with its text (greedy), checked after every
    round of `steps` steps; saved in place. Rounds continue until every answer lands, so the
    fixture never depends on how fast training converges on a given CPU."""
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    batches = []
    for prompt, answer in pairs:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        target = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + target])  # x: [1, prompt + answer]
        labels = x.clone()
        labels[0, : len(ids)] = -100  # learn the answer only
        batches.append((x, labels, len(ids)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(max_rounds):
        model.train()
        for step in range(steps):
            x, labels, _n = batches[step % len(batches)]
            loss = model(input_ids=x, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        if all(_answers(model, x, n) for x, _labels, n in batches):
            break
    else:
        raise AssertionError(f"tiny model did not learn its answers in {max_rounds * steps} steps")
    model.save_pretrained(model_dir)
    return model_dir


@torch.no_grad()
def _answers(model: Qwen2ForCausalLM, x: torch.Tensor, n_prompt: int) -> bool:
    """Greedy decoding of the prompt reproduces the taught answer token for token."""
    prompt, target = x[:, :n_prompt], x[0, n_prompt:]
    out = model.generate(prompt, max_new_tokens=len(target), do_sample=False,
                         eos_token_id=int(target[-1]))  # out: [1, prompt + <= answer]
    return bool(torch.equal(out[0, n_prompt:], target))


def peft_adapter(base_dir: Path, out_dir: Path, rank: int = 4, alpha: float = 8.0,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0) -> Path:
    """A real PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the tiny
    base model, with random non-zero A and B so it changes the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                            init_lora_weights=False))
    with torch.no_grad():  # peft's random init is small; make the adapter's effect clear
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str, max_new: int) -> list[int]:
    """Greedy completion token ids from transformers (+ peft with the adapter alone)."""
    from peft import PeftModel

    tok = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])  # [1, prompt]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]
