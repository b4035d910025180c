"""Distillation of the expansion task: the cloud model sketches questions and expands the points
itself (`data`), a LoRA adapter for an edge model learns to write those expansions (`train`)."""

from pice.edge.distill.config import DistillConfig
from pice.edge.distill.data import SketchFn, generate_pairs, load_questions
from pice.edge.distill.shipped import EXPANDER_ADAPTER, shipped_adapter
from pice.edge.distill.train import train_adapter

__all__ = [
    "EXPANDER_ADAPTER",
    "DistillConfig",
    "SketchFn",
    "generate_pairs",
    "load_questions",
    "shipped_adapter",
    "train_adapter",
]
