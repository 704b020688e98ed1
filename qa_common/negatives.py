"""Unanswerable questions made from answerable ones, so SQuAD 1.1-style data can teach a model to abstain.

A question is paired with another paragraph that contains none of its gold answer texts (compared
after :func:`qa_common.metric.normalize_answer`, as a substring, so even a partial-word match
disqualifies a paragraph). The new record has empty answers: training labels its windows at the
[CLS] token, the "no answer" position.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from qa_common.metric import normalize_answer

TRIES_PER_NEGATIVE = 20  # random paragraphs tried before giving up on one negative


def synthesise_negatives(
    records: Sequence[dict], ratio: float, *, seed: int = 0, paragraphs: Sequence[dict] | None = None
) -> list[dict]:
    """About ``ratio`` unanswerable questions per answerable record in ``records`` (new records only).

    ``paragraphs`` are records whose ``context`` (and ``title``) may be borrowed; default: ``records``
    themselves. Each answerable question gets ``floor(ratio)`` negatives, plus one for a seeded
    random share ``ratio - floor(ratio)`` of them, each on a different paragraph; ids are
    ``"<id>-neg<k>"``. A question for which no suitable paragraph turns up in a few random tries
    gets fewer. Deterministic for a given ``seed``.
    """
    if ratio < 0:
        raise ValueError(f"the negative ratio must be >= 0, got {ratio}")
    rng = random.Random(seed)
    answerable = [record for record in records if record["answers"]["text"]]
    sources = {}  # distinct contexts, in first-seen order, with the title of their first record
    for record in paragraphs if paragraphs is not None else records:
        sources.setdefault(record["context"], record.get("title", ""))
    contexts = list(sources)
    normalised = [normalize_answer(context) for context in contexts]
    counts = [math.floor(ratio)] * len(answerable)
    for index in rng.sample(range(len(answerable)), round((ratio - math.floor(ratio)) * len(answerable))):
        counts[index] += 1
    taken_ids = {record["id"] for record in records}
    negatives = []
    for record, count in zip(answerable, counts):
        golds = {normalize_answer(text) for text in record["answers"]["text"]}
        used = {record["context"]}
        for k in range(count):
            choice = _pick_paragraph(rng, contexts, normalised, golds, used)
            if choice is None:
                break
            used.add(contexts[choice])
            new_id = f"{record['id']}-neg{k}"
            while new_id in taken_ids:
                new_id += "x"
            taken_ids.add(new_id)
            negatives.append({
                "id": new_id, "title": sources[contexts[choice]], "context": contexts[choice],
                "question": record["question"], "answers": {"text": [], "answer_start": []},
            })
    return negatives


def _pick_paragraph(rng: random.Random, contexts, normalised, golds: set[str], used: set[str]) -> int | None:
    for _ in range(TRIES_PER_NEGATIVE):
        choice = rng.randrange(len(contexts))
        if contexts[choice] not in used and not any(gold in normalised[choice] for gold in golds):
            return choice
    return None
