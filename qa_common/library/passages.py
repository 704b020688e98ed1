"""Cut a document's text blocks into passages: the units a library retrieves and the reader reads.

A passage holds whole blocks (paragraphs) of one page and one section, joined by line breaks, up to
``max_words`` words; a longer block is cut at sentence ends (a sentence longer than that, at
words). So every passage has exactly one ``page`` and ``section`` to cite, and retrieval scores
passages of comparable size. 150 words (about 200 word pieces) fit one 256-token reader window
beside the question, and all-MiniLM-L6-v2 embeds up to 256 word pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qa_common.library.documents import Block

MAX_PASSAGE_WORDS = 150
# Where a long block is cut, and where a passage's sentences end: after . ! ? ; : and between its
# blocks (a list item or a heading ends without a full stop).
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


@dataclass(frozen=True)
class Passage:
    text: str
    page: int | None
    section: str


def _words(text: str) -> int:
    return len(text.split())


def _pieces(text: str, max_words: int) -> list[str]:
    """``text`` cut at sentence ends (or, for an over-long sentence, at words) into pieces of at most ``max_words``."""
    if _words(text) <= max_words:
        return [text]
    sentences = []
    for sentence in SENTENCE_END.split(text):
        words = sentence.split()
        sentences += [" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words)]
    return _pack(sentences, max_words, " ")


def _pack(parts: Sequence[str], max_words: int, joiner: str) -> list[str]:
    packed, current, used = [], [], 0
    for part in parts:
        count = _words(part)
        if current and used + count > max_words:
            packed.append(joiner.join(current))
            current, used = [], 0
        current.append(part)
        used += count
    if current:
        packed.append(joiner.join(current))
    return packed


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text`` (cut at :data:`SENTENCE_END`), blanks left out."""
    spans, start = [], 0
    for end in SENTENCE_END.finditer(text):
        spans.append((start, end.start()))
        start = end.end()
    spans.append((start, len(text)))
    return [(begin, end) for begin, end in spans if text[begin:end].strip()]


def split_passages(blocks: Iterable[Block], max_words: int = MAX_PASSAGE_WORDS) -> list[Passage]:
    """The passages of one document's blocks, in reading order (see the module docstring)."""
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    passages, run, where = [], [], None
    for block in [*blocks, None]:
        here = (block.page, block.section) if block else None
        if run and here != where:
            passages += [Passage(text, *where) for text in _pack(run, max_words, "\n")]
            run = []
        if block:
            run += _pieces(block.text, max_words)
            where = here
    return passages
