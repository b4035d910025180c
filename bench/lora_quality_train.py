"""Cheap but real LoRA training for the quality bench: the adapters sit on the top `top` layers
only, so the frozen lower layers' output is computed once per dataset and cached; a training
(or evaluation) step then runs the top layers, the final norm and the LM head at the answer
positions alone.

Lower states: the prompts are the same for every task, so each prompt runs through the lower
layers once (its KV cache kept) and every task's answer tokens continue from it in one batch.
Sequences are right-padded and attention is causal, so padding never reaches a real token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Seq = tuple[torch.Tensor, list[int], int]  # lower states [n, hidden], token ids [n], prompt len


class TopStack:
    """The top `top` decoder layers of an HF causal LM (peft-injected ones included, as the
    layer objects are shared), its final norm and LM head."""

    def __init__(self, model: Any, top: int) -> None:
        inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
        assert model.config._attn_implementation == "sdpa", "causal mask relies on sdpa"
        self.layers = list(inner.layers[-top:])
        self.norm, self.rotary = inner.norm, inner.rotary_emb
        self.head = (model.get_base_model() if hasattr(model, "get_base_model")
                     else model).lm_head

    def logits(self, seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [P, V] at the positions that predict an answer token, targets [P])."""
        width = max(len(ids) for _, ids, _ in seqs)
        hidden = seqs[0][0].shape[1]
        x = torch.zeros(len(seqs), width, hidden)  # [b, L, hidden]
        target = torch.full((len(seqs), width), -100, dtype=torch.long)  # next token per pos
        for i, (s, ids, p) in enumerate(seqs):
            x[i, :len(ids)] = s
            target[i, p - 1:len(ids) - 1] = torch.tensor(ids[p:])
        pos = torch.arange(width).unsqueeze(0).expand(len(seqs), -1)
        pe = self.rotary(x, pos)
        for layer in self.layers:  # attention_mask None: sdpa's causal path
            x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        keep = target != -100
        return self.head(self.norm(x[keep])), target[keep]  # [P, V], [P]


def lower_states(model: Any, top: int, prompts: list[list[int]],
                 answers: list[list[list[int]]]) -> list[list[Seq]]:
    """[task][example] (states, ids, prompt length): the output of all but the top `top`
    layers for prompt + that task's answer. answers: [task][example] token ids. The prompts
    run once, left-padded in one batch; each task's answers continue from their KV cache
    (cropped back to the prompts after each task)."""
    from transformers import DynamicCache

    inner = model.model
    layers, norm = inner.layers, inner.norm
    inner.layers = torch.nn.ModuleList(list(layers)[:len(layers) - top])
    inner.norm = torch.nn.Identity()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
    lens = torch.tensor([len(p) for p in prompts])
    out: list[list[Seq]] = [[] for _ in answers]
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            first = inner(input_ids=ids, attention_mask=mask,
                          position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=cache,
                          use_cache=True).last_hidden_state  # [examples, width, hidden]
            for t, ans in enumerate(answers):
                w = max(len(a) for a in ans)
                aid = torch.zeros(len(ans), w, dtype=torch.long)
                amask = torch.zeros_like(aid)
                for j, a in enumerate(ans):
                    aid[j, :len(a)], amask[j, :len(a)] = torch.tensor(a), 1
                rest = inner(input_ids=aid, attention_mask=torch.cat([mask, amask], 1),
                             position_ids=lens[:, None] + torch.arange(w), cache=cache,
                             use_cache=True).last_hidden_state  # [examples, w, hidden]
                cache.crop(-w)  # back to the prompts
                for j, (p, a) in enumerate(zip(prompts, ans, strict=True)):
                    s = torch.cat([first[j, width - len(p):], rest[j, :len(a)]])
                    out[t].append((s.clone(), p + a, len(p)))
    finally:
        inner.layers, inner.norm = layers, norm
    return out


def save_states(path: Path, seqs: list[Seq]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"s{i}": s.contiguous() for i, (s, _, _) in enumerate(seqs)}, str(path),
              metadata={"ids": json.dumps([ids for _, ids, _ in seqs]),
                        "prompt": json.dumps([p for _, _, p in seqs])})


def load_states(path: Path) -> list[Seq]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    ids, plen = json.loads(meta["ids"]), json.loads(meta["prompt"])
    return [(tensors[f"s{i}"], ids[i], plen[i]) for i in range(len(ids))]


def loss_of(stack: TopStack, seqs: list[Seq]) -> tuple[float, torch.Tensor]:
    """(mean answer cross-entropy, greedy (argmax) token per answer position [P])."""
    with torch.no_grad():
        logits, target = stack.logits(seqs)
    return float(torch.nn.functional.cross_entropy(logits, target)), logits.argmax(-1)


def train_one(base: Any, top: int, seqs: list[Seq], out: Path, *, seed: int, steps: int,
              rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
              lr: float = 5e-3, batch: int = 4) -> tuple[Any, dict[str, float]]:
    """Train one LoRA (its own seed: A's initialisation and the batch order) on the top layers,
    save it to `out`; returns (the bare base model again, {loss_start, loss_end})."""
    from peft import LoraConfig, get_peft_model

    layers = base.config.num_hidden_layers
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                     layers_to_transform=list(range(layers - top, layers)),
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    stack = TopStack(model, top)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(seqs))[:batch].tolist()
        logits, target = stack.logits([seqs[i] for i in idx])
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.save_pretrained(str(out))
    k = max(1, steps // 5)
    log = {"train_loss_start": sum(losses[:k]) / k, "train_loss_end": sum(losses[-k:]) / k}
    (out / "train_log.json").write_text(json.dumps(log | {"seed": seed, "steps": steps}))
    return model.unload(), log
