"""Turn a GGUF file into a plain transformers directory (config, safetensors, tokenizer).

transformers can read GGUF directly, but it dequantizes every tensor on every load; converting
once makes later loads a fast safetensors mmap and lets every backend use one code path.
The weights are the dequantized Q4_K_M values stored as float32, not the original checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pice.shared.errors import UnsupportedModelError
from pice.shared.models.assemble import read_marker, sha256_file
from pice.shared.models.cache import file_lock, stage

MARKER_NAME = "pice.json"


def read_convert_marker(out_dir: Path) -> dict[str, Any] | None:
    """The `pice.json` written by a finished conversion, or None if there is none (or it is bad)."""
    try:
        data = json.loads((out_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _tmp_dir(out_dir: Path) -> Path:
    # Not `with_suffix`: aliases like "qwen2.5-coder-0.5b" contain dots, so with_suffix would
    # cut the name at the last dot and let two different models share one temp dir.
    return out_dir.with_name(out_dir.name + ".tmp")


def convert_gguf(
    gguf_path: Path, out_dir: Path, *, sha256: str | None = None, progress: bool = True,
    weights: bool = True,
) -> Path:
    """Convert `gguf_path` into `out_dir` (atomically) and return `out_dir`.

    An `out_dir` that already holds a `pice.json` marker is returned as is. `sha256` is the
    source digest to record; when omitted it comes from the assembler's marker or is computed.
    `weights=False` writes only the config, tokenizer and generation config: the engine reads
    the weights from the GGUF itself, kept quantized (no dense copy, no fp32 load).
    Raises UnsupportedModelError when transformers cannot read the GGUF's architecture.
    """
    if read_convert_marker(out_dir) is not None:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.parent, out_dir.name):
        # Another process may have finished while this one waited for the lock.
        if read_convert_marker(out_dir) is not None:
            return out_dir
        if out_dir.exists():
            # Every dir this module publishes has a marker, so this one is not ours to delete.
            raise FileExistsError(f"{out_dir} exists but has no {MARKER_NAME}; remove it first")
        digest = sha256 or read_marker(gguf_path) or sha256_file(gguf_path, progress)
        tmp = _tmp_dir(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died mid-conversion
        what = "convert to float32" if weights else "read config and tokenizer of"
        try:
            with stage(what, gguf_path.name, gguf_path.stat().st_size if weights else None):
                if weights:
                    chat_template = _convert_into(gguf_path, tmp, progress)
                else:
                    chat_template = _convert_meta(gguf_path, tmp)
            marker = {
                "source_filename": gguf_path.name,
                "source_sha256": digest.lower(),
                "dtype": "float32" if weights else "none (weights in the GGUF)",
                "has_chat_template": chat_template,
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            tmp.rename(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _convert_into(gguf_path: Path, tmp: Path, progress: bool) -> bool:
    """Load the GGUF with transformers and save it into `tmp`; True if it has a chat template."""
    # Imported here so that listing or assembling models never pays for importing torch.
    from transformers.utils import logging as hf_logging

    # Silences transformers' shard-writing bar, then restores the process-wide switch. Its GGUF
    # dequantize bar (a bare tqdm in 5.24) ignores this switch and still shows.
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return _load_and_save(gguf_path, tmp)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _convert_meta(gguf_path: Path, tmp: Path) -> bool:
    """Config, tokenizer and generation config of the GGUF (no weights); True if it has a chat
    template."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    except (ValueError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"cannot convert {gguf_path}: {exc}") from exc
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    return bool(getattr(tokenizer, "chat_template", None))


def _load_and_save(gguf_path: Path, tmp: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantizes GGUF into a plain model
        pass
    else:
        # 5.x keeps weights in packed GGUF blocks when the `kernels` package has a matmul for
        # them; packed layers cannot be saved, so ask for dense float32 weights explicitly.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src_dir, **kwargs)
    except (ValueError, NotImplementedError) as exc:
        # transformers raises these for a GGUF architecture or tensor type it cannot map.
        raise UnsupportedModelError(f"cannot convert {gguf_path}: {exc}") from exc
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already dense; only the leftover "gguf" quantization tag makes
        # save_pretrained refuse, and keeping it in config.json would misdescribe the files.
        quantizer.remove_quantization_config(model)
    tmp.mkdir(parents=True)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    return bool(getattr(tokenizer, "chat_template", None))
