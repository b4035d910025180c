"""`pice bench lora --compressed --quality`: real adapters, compressed vs original.

Trains `n` LoRAs on the packaged edge model, each from its own seed on its own small task (a text
transformation of the shipped question set: upper-casing, word order, acronyms, ...; prompts
never name the task, so only the adapter knows it), then compresses them jointly (JD-Full, the
budget's choice of rank and clusters) and measures, per task on held-out inputs: the answer
loss of the original adapter vs the compressed one (materialised B' = U Σ_i, A' = Vᵀ, exactly
what the compressed serving path computes) and their next-token agreement (teacher-forced
argmax at the answer positions). Both the budgeted store (over-budget adapters stay original)
and a forced one (every adapter compressed) are measured. Resumable: trained adapters are kept
in <out>/lora_cq/. Writes lora_compressed_quality.json + .png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _tasks() -> list[tuple[str, Any]]:
    """24 small tasks: (name, question -> answer)."""
    def words(q: str) -> list[str]:
        return q.rstrip("?.!").split()

    def caesar(s: str, k: int) -> str:
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) if c.islower() else c for c in s)

    out: list[tuple[str, Any]] = []
    for k in (2, 3, 4):
        out.append((f"first-{k}-words", lambda q, k=k: " ".join(words(q)[:k])))
        out.append((f"last-{k}-words", lambda q, k=k: " ".join(words(q)[-k:])))
        out.append((f"caesar-{k}", lambda q, k=k: caesar(" ".join(words(q)[:3]).lower(), k)))
        out.append((f"word-{k}-upper", lambda q, k=k: (words(q) + ["-"] * 9)[k].upper()))
    out += [("upper", lambda q: " ".join(words(q)[:5]).upper()),
            ("reverse", lambda q: " ".join(reversed(words(q)))[:60]),
            ("acronym", lambda q: "".join(w[0] for w in words(q)).upper()),
            ("count", lambda q: f"{_WORDS[min(9, len(words(q)) % 10)]} words"),
            ("longest", lambda q: max(words(q), key=len)),
            ("shortest", lambda q: min(words(q), key=len)),
            ("sorted", lambda q: " ".join(sorted(w.lower() for w in words(q)[:6]))),
            ("vowels", lambda q: "".join(c for c in q.lower() if c in "aeiou")[:20]),
            ("dashed", lambda q: "-".join(words(q)[:4]).lower()),
            ("yes-no", lambda q: "yes" if len(words(q)) % 2 == 0 else "no"),
            ("lengths", lambda q: " ".join(str(len(w)) for w in words(q)[:6])),
            ("initials-lower", lambda q: " ".join(w[:2].lower() for w in words(q)[:6]))]
    return out


def _data(tok: Any, fn: Any, questions: list[str]) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for q in questions:
        p = tok(f"Input: {q}\nOutput:", add_special_tokens=False)["input_ids"]
        a = tok(" " + fn(q) + tok.eos_token, add_special_tokens=False)["input_ids"]
        pairs.append((p, a))
    return pairs


def _batch(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids [b, L], attention mask, labels (answers only)."""
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(a)
    return ids, mask, labels


def train(model_dir: Path, out: Path, n: int, steps: int, seed: int, questions: list[str],
          last_layers: int) -> list[tuple[str, Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    tasks = _tasks()[:n]
    todo = [(i, t) for i, t in enumerate(tasks) if not (out / f"task{i:02d}-{t[0]}" /
                                                        "adapter_model.safetensors").exists()]
    if todo:
        base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for i, (name, fn) in tqdm(todo, desc="train LoRAs", unit="adapter"):
        torch.manual_seed(seed * 1000 + i)  # its own initialisation (A) and batch order
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                         layers_to_transform=list(range(layers - last_layers, layers)),
                         lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        data = _data(tok, fn, questions)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(data))[:4].tolist()
            ids, mask, labels = _batch([data[j] for j in idx])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.save_pretrained(str(out / f"task{i:02d}-{name}"))
        base = model.unload()  # the bare base model again for the next adapter
    return [(t[0], out / f"task{i:02d}-{t[0]}") for i, t in enumerate(tasks)]


@torch.no_grad()
def _eval(model: Any, batch: tuple[torch.Tensor, ...]) -> tuple[float, torch.Tensor]:
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [b, L-1, V]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             target.reshape(-1), ignore_index=-100)
    return float(loss), logits.argmax(-1)[target != -100]


def run_quality(model_dir: Path, out_dir: Path, n: int = 24, steps: int = 40,
                seed: int = 0, budget: float = 0.3, last_layers: int = 4,
                held_out: int = 10) -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pice.bench.lora_adapters import materialize
    from pice.shared.lora.compress import CompressConfig, Source, compress
    from pice.shared.lora.compress.serve import shape_from_config

    qs = [json.loads(x)["question"] for x in
          (Path(__file__).parent / "questions.jsonl").read_text().splitlines() if x.strip()]
    train_q, test_q = qs[:60], qs[60:60 + held_out]
    work = out_dir / "lora_cq"
    t0 = time.perf_counter()
    ads = train(model_dir, work, n, steps, seed, train_q, last_layers)
    train_s = time.perf_counter() - t0
    shape = shape_from_config(model_dir)
    sources = [Source(name, path) for name, path in ads]
    stores = {}
    for label, b in (("budget", budget), ("forced", 1e9)):
        # ranks below the adapters' total rank (n x 8): a basis cannot just hold them all
        cfg = CompressConfig(budget=b, ranks=[r for r in (8, 16, 32) if r < 8 * n],
                             clusters=[1, 2, 4])
        stores[label] = (work / f"store-{label}",
                         compress(sources, shape, work / f"store-{label}", cfg))
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for (name, path), (_, fn) in tqdm(list(zip(ads, _tasks(), strict=False)), desc="evaluate"):
        batch = _batch(_data(tok, fn, test_q))
        row: dict[str, Any] = {"task": name}
        model = PeftModel.from_pretrained(base, str(path)).eval()
        row["loss_original"], ref = _eval(model, batch)
        base = model.unload()
        row["loss_base"], pred = _eval(base, batch)
        row["agree_base"] = float((pred == ref).float().mean())
        for label, (store, manifest) in stores.items():
            entry = manifest["adapters"][name]
            row[f"{label}_status"], row[f"{label}_error"] = entry["status"], entry.get(
                "error_max")
            if entry["status"] != "compressed":
                row[f"loss_{label}"], row[f"agree_{label}"] = row["loss_original"], 1.0
                continue
            mat = materialize(store, name, work / f"mat-{label}" / name)
            model = PeftModel.from_pretrained(base, str(mat)).eval()
            row[f"loss_{label}"], pred = _eval(model, batch)
            row[f"agree_{label}"] = float((pred == ref).float().mean())
            base = model.unload()
        rows.append(row)
    result = {"model": str(model_dir), "adapters": n, "train_steps": steps,
              "lora": f"r=8 alpha=16 q_proj,v_proj, last {last_layers} layers",
              "held_out": len(test_q),
              "train_seconds": train_s, "budget": budget, "rows": rows,
              "stores": {k: m["totals"] | {"clusters_detail": {
                  c: {"rank": v["rank"], "members": len(v["members"])}
                  for c, v in m["clusters"].items()}} for k, (_, m) in stores.items()}}
    (out_dir / "lora_compressed_quality.json").write_text(json.dumps(result, indent=2))
    _plot(result, out_dir / "lora_compressed_quality.png")
    return result


def quality_table(r: dict[str, Any]) -> str:
    lines = [f"{'task':22} {'base':>6} {'orig':>6} {'forced':>7} {'agree':>6} {'err':>6} "
             f"{'budget':>7} {'agree':>6} status"]
    for x in r["rows"]:
        lines.append(f"{x['task'][:22]:22} {x['loss_base']:6.3f} {x['loss_original']:6.3f} "
                     f"{x['loss_forced']:7.3f} {x['agree_forced']:6.2f} "
                     f"{x['forced_error'] or 0:6.3f} {x['loss_budget']:7.3f} "
                     f"{x['agree_budget']:6.2f} {x['budget_status']}")
    for k, t in r["stores"].items():
        lines.append(f"{k}: {t['compressed']}/{t['adapters']} compressed, {t['clusters']} "
                     f"clusters {t['clusters_detail']}, {t['bytes_saved'] / 2**20:.1f} MiB saved")
    return "\n".join(lines)


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for key, label in (("loss_base", "base model"), ("loss_original", "original LoRA"),
                       ("loss_forced", "compressed (forced)"),
                       ("loss_budget", "compressed (budget)")):
        axes[0].plot(x, [row[key] for row in rows], "o-", label=label, ms=4)
    axes[1].bar(x, [row["agree_forced"] for row in rows], label="forced")
    axes[1].plot(x, [row["agree_budget"] for row in rows], "k.", label="budget")
    for ax, title in ((axes[0], "held-out answer loss"),
                      (axes[1], "next-token agreement with the original LoRA")):
        ax.set_xticks(list(x), [row["task"] for row in rows], rotation=75, fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"real LoRAs ({r['adapters']}, own seeds and tasks) compressed vs original")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
