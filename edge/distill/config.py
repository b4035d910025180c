"""Settings of one `pice train expander` run (typed, validated with messages naming the field)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pice.shared.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

DEFAULT_QUESTIONS = Path(__file__).parent / "data" / "train_questions.jsonl"


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cloud_model: str = DEFAULT_CLOUD_MODEL  # the teacher: sketches and expands
    edge_model: str = DEFAULT_EDGE_MODEL  # the student the adapter is for
    questions: Path = DEFAULT_QUESTIONS  # JSONL with "id" and "question" (not the bench set)
    limit: int = Field(0, ge=0)  # questions to use (0 → all)
    out_dir: Path = Path("adapters/expander")  # adapter_config.json + adapter_model.safetensors
    data: Path | None = None  # teacher pairs JSONL (None → <out_dir>/pairs.jsonl); reused if there
    cache_dir: Path | None = None
    # data generation
    batch_questions: int = Field(8, ge=1, le=256)  # questions sketched/expanded per batch
    max_points: int = Field(6, ge=2, le=10)  # as `pice serve` sketches by default
    words_per_point: int = Field(5, ge=1, le=20)
    point_tokens: int = Field(48, ge=8, le=512)  # teacher tokens per expansion
    # training
    steps: int = Field(120, ge=1)
    batch_size: int = Field(1, ge=1, le=64)
    lr: float = Field(3e-4, gt=0, le=1.0)
    rank: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    last_layers: int = Field(0, ge=0)  # LoRA on the last N decoder layers only (0 → all)
    max_seq_len: int = Field(384, ge=16, le=8192)  # prompt + target tokens (prompt cut first)
    checkpoint_every: int = Field(20, ge=1)
    resume: bool = False  # continue from <out_dir>/checkpoint
    seed: int = 0
    threads: int = Field(0, ge=0)  # torch threads (0 → leave as is)

    @property
    def pairs_path(self) -> Path:
        return self.data if self.data is not None else self.out_dir / "pairs.jsonl"
