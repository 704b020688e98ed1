"""Unanswerable questions made from answerable ones, so SQuAD 1.1-style data can teach a model to abstain.

A question is paired with another paragraph that contains none of its gold answer texts (compared
after :func:`qa_common.metric.normalize_answer`, as a substring, so even a partial-word match
disqualifies a paragraph). The new record has empty answers: training labels its windows at the
[CLS] token, the "no answer" position.

Where the paragraph comes from (``source``):

- ``article``: another paragraph of the question's own article (same ``title``): same topic, the
  answer absent -- what "the document doesn't say" looks like, and the harder case;
- ``other``: a paragraph of another article: an off-topic passage, the easy case;
- ``mix``: each negative draws one of the two at random (the other when that one finds no paragraph).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from qa_common.metric import normalize_answer

TRIES_PER_NEGATIVE = 20  # random paragraphs tried before giving up on one negative
SOURCES = ("article", "other", "mix")


def synthesise_negatives(
    records: Sequence[dict], ratio: float, *, seed: int = 0, paragraphs: Sequence[dict] | None = None,
    source: str = "other",
) -> list[dict]:
    """About ``ratio`` unanswerable questions per answerable record in ``records`` (new records only).

    ``paragraphs`` are records whose ``context`` (and ``title``) may be borrowed; default: ``records``
    themselves. ``source`` says which of them (module docstring). Each answerable question gets
    ``floor(ratio)`` negatives, plus one for a seeded random share ``ratio - floor(ratio)`` of them,
    each on a different paragraph; ids are ``"<id>-neg<k>"``. A question for which no suitable
    paragraph turns up in a few random tries (an article of one paragraph, say) gets fewer.
    Deterministic for a given ``seed``.
    """
    if ratio < 0:
        raise ValueError(f"the negative ratio must be >= 0, got {ratio}")
    if source not in SOURCES:
        raise ValueError(f"the negative source must be one of {', '.join(SOURCES)}, got {source!r}")
    rng = random.Random(seed)
    answerable = [record for record in records if record["answers"]["text"]]
    titles = {}  # distinct contexts, in first-seen order, with the title of their first record
    for record in paragraphs if paragraphs is not None else records:
        titles.setdefault(record["context"], record.get("title", ""))
    contexts = list(titles)
    normalised = [normalize_answer(context) for context in contexts]
    in_article: dict[str, list[int]] = {}  # title -> indices of its paragraphs
    for index, context in enumerate(contexts):
        in_article.setdefault(titles[context], []).append(index)
    counts = [math.floor(ratio)] * len(answerable)
    for index in rng.sample(range(len(answerable)), round((ratio - math.floor(ratio)) * len(answerable))):
        counts[index] += 1
    taken_ids = {record["id"] for record in records}
    negatives = []
    for record, count in zip(answerable, counts):
        golds = {normalize_answer(text) for text in record["answers"]["text"]}
        used = {record["context"]}
        title = record.get("title", "")
        for k in range(count):
            same_article = source == "article" or (source == "mix" and rng.random() < 0.5)
            tries = [same_article, not same_article] if source == "mix" else [same_article]
            choice = None
            for same in tries:
                choice = _pick_paragraph(rng, contexts, normalised, golds, used, titles=titles,
                                         pool=in_article.get(title, []) if same else None,
                                         avoid_title=None if same else title)
                if choice is not None:
                    break
            if choice is None:
                break
            used.add(contexts[choice])
            new_id = f"{record['id']}-neg{k}"
            while new_id in taken_ids:
                new_id += "x"
            taken_ids.add(new_id)
            negatives.append({
                "id": new_id, "title": titles[contexts[choice]], "context": contexts[choice],
                "question": record["question"], "answers": {"text": [], "answer_start": []},
            })
    return negatives


def _pick_paragraph(rng: random.Random, contexts, normalised, golds: set[str], used: set[str], *,
                    pool: list[int] | None, avoid_title: str | None, titles: dict) -> int | None:
    """A random paragraph from ``pool`` (default: all) outside ``avoid_title``'s article, not in
    ``used``, holding none of ``golds``; None after a few tries."""
    for _ in range(TRIES_PER_NEGATIVE):
        if pool is not None and not pool:
            return None
        choice = rng.choice(pool) if pool is not None else rng.randrange(len(contexts))
        if (contexts[choice] not in used and (avoid_title is None or titles[contexts[choice]] != avoid_title)
                and not any(gold in normalised[choice] for gold in golds)):
            return choice
    return None
