"""The packaged MiniLM loads offline and embeds meaningfully."""

from __future__ import annotations

import numpy as np

from pice.shared.embeddings import get_embedder


def test_packaged_minilm_unit_vectors_and_meaningful_similarity() -> None:
    emb = get_embedder()
    assert get_embedder() is emb  # one copy per process
    v = emb.encode(["How can I sleep better?", "Tips for better sleep",
                    "Write a Python function that sorts a list"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert emb.encode([]).shape == (0, 384)
