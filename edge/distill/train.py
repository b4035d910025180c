"""LoRA training of an edge model on (expansion prompt → teacher expansion) pairs, with peft on the
CPU. Resumable: every `checkpoint_every` steps the adapter, the optimizer state (safetensors) and
the step (JSON) go to <out_dir>/checkpoint; `resume` continues from there. The result is a PEFT
adapter directory (adapter_config.json + adapter_model.safetensors) for the Multi-LoRA pool."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from pice.edge.distill.config import DistillConfig
from pice.edge.distill.data import read_pairs
from pice.edge.expander import assistant_prefix, expansion_messages
from pice.shared.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (input ids, labels with -100 over the prompt)


def build_examples(chat: ChatTokenizer, pairs_path: Path, max_seq_len: int) -> list[Example]:
    """The student's own expansion prompt (its chat template, the assistant prefix) followed by
    the teacher's text and an end-of-turn token; the loss covers the target only."""
    eos = chat.tok.eos_token or ""
    examples = []
    for task, text in read_pairs(pairs_path):
        prompt = chat.encode(chat.render_chat(expansion_messages(task), assistant_prefix(task)))
        target = chat.encode(text + eos)[: max_seq_len // 2]
        prompt = prompt[-(max_seq_len - len(target)):]  # keep the end: the point to write
        examples.append((prompt + target, [-100] * len(prompt) + target))
    return examples


def _collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, width]
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # [batch, width]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, width]
    for row, (x, y) in enumerate(batch):  # right padding: training needs no generation
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _lora_model(base_path: str, cfg: DistillConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # an optional dependency
        raise ImportError("pice train expander needs peft: pip install 'pice[train]'") from exc

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    n_layers = int(model.config.num_hidden_layers)
    layers = (list(range(max(0, n_layers - cfg.last_layers), n_layers))
              if cfg.last_layers else None)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), layers_to_transform=layers,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _save_checkpoint(ckpt: Path, model: Any, opt: torch.optim.Optimizer, step: int,
                     losses: list[float]) -> None:
    from peft import get_peft_model_state_dict

    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(ckpt / "adapter.safetensors"))
    sd = opt.state_dict()
    tensors = {f"{idx}.{name}": t.contiguous() for idx, st in sd["state"].items()
               for name, t in st.items()}
    save_file(tensors, str(ckpt / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    (ckpt / "state.json").write_text(json.dumps({"step": step, "losses": losses,
                                                 "param_groups": groups}))


def _load_checkpoint(ckpt: Path, model: Any, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
    from peft import set_peft_model_state_dict

    meta = json.loads((ckpt / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter.safetensors")))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(ckpt / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["losses"])


def train_adapter(cfg: DistillConfig, base_path: str, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the adapter and save it in PEFT format to `cfg.out_dir`. Returns the
    run's figures (also written to <out_dir>/training.json)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    chat = ChatTokenizer(base_path, 1 << 20)
    examples = build_examples(chat, cfg.pairs_path, cfg.max_seq_len)
    if not examples:
        raise ValueError(f"no usable teacher pairs in {cfg.pairs_path}")
    torch.manual_seed(cfg.seed)
    model = _lora_model(base_path, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = cfg.out_dir / "checkpoint"
    step, losses = 0, list[float]()
    if cfg.resume and (ckpt / "state.json").exists():
        step, losses = _load_checkpoint(ckpt, model, opt)
        log.info("resuming from step %d", step)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    pad_id = int(chat.tok.pad_token_id)
    warmup = max(1, cfg.steps // 10)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="train expander", unit="step",
               disable=not progress)
    while step < cfg.steps:
        torch.manual_seed(cfg.seed + step)  # dropout masks replay the same after a resume
        picks = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        batch = _collate([examples[i] for i in picks], pad_id)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / warmup)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(ckpt, model, opt, step, losses)
    bar.close()
    model.eval()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(cfg.out_dir), safe_serialization=True)
    adapter_cfg = cfg.out_dir / "adapter_config.json"
    meta = json.loads(adapter_cfg.read_text())
    meta["base_model_name_or_path"] = cfg.edge_model  # the spec, not this machine's path
    adapter_cfg.write_text(json.dumps(meta, indent=2))
    window = max(1, min(10, len(losses) // 2))
    report = {"steps": step, "examples": len(examples), "train_seconds_this_run":
              time.perf_counter() - t0, "loss_first": statistics_mean(losses[:window]),
              "loss_last": statistics_mean(losses[-window:]), "base": cfg.edge_model,
              "rank": cfg.rank, "target_modules": cfg.target_modules,
              "last_layers": cfg.last_layers, "max_seq_len": cfg.max_seq_len,
              "batch_size": cfg.batch_size, "lr": cfg.lr}
    (cfg.out_dir / "training.json").write_text(json.dumps(report, indent=2))
    return report


def statistics_mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
