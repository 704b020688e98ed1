"""Choosing questions from a SQuAD-format file: seeded samples spread over its articles, held-out articles.

SQuAD files are ordered by article, so "the first N questions" is one or two articles: one topic.
These functions choose across the whole file instead. An article is the ``title`` of a record
(records without one form a single article). Both are deterministic for a given ``seed`` and keep
the records in file order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

SAMPLINGS = ("spread", "first")


def _by_article(records: Sequence[dict]) -> dict[str, list[int]]:
    articles: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        articles.setdefault(record.get("title", ""), []).append(index)
    return articles


def sample_questions(records: Sequence[dict], n: int | None, *, seed: int, how: str = "spread") -> list[dict]:
    """``n`` of ``records``' questions (all of them when ``n`` is None or not smaller).

    ``spread``: every article keeps its share (``n`` split over the articles in proportion to their
    sizes, the remainders going to the largest fractions), each share a seeded random draw from its
    article. ``first``: the first ``n`` questions of the file. Records sharing a ``group`` (one
    question read over several passages) are one question: chosen or left out together.
    """
    if any("group" in record for record in records):
        groups: dict[str, list[dict]] = {}
        for record in records:
            groups.setdefault(record.get("group", record["id"]), []).append(record)
        chosen = {id(record) for record in _sample([group[0] for group in groups.values()], n, seed=seed, how=how)}
        return [record for group in groups.values() if id(group[0]) in chosen for record in group]
    return _sample(records, n, seed=seed, how=how)


def _sample(records: Sequence[dict], n: int | None, *, seed: int, how: str) -> list[dict]:
    if how not in SAMPLINGS:
        raise ValueError(f"the sampling must be one of {', '.join(SAMPLINGS)}, got {how!r}")
    if n is None or n >= len(records):
        return list(records)
    if how == "first":
        return list(records[:n])
    articles = list(_by_article(records).values())
    exact = [n * len(indices) / len(records) for indices in articles]
    shares = [math.floor(x) for x in exact]
    for article in sorted(range(len(articles)), key=lambda a: shares[a] - exact[a])[: n - sum(shares)]:
        shares[article] += 1
    rng = random.Random(seed)
    chosen = sorted(i for indices, share in zip(articles, shares) for i in rng.sample(indices, share))
    return [records[i] for i in chosen]


def hold_out_articles(records: Sequence[dict], n: int, *, seed: int) -> tuple[list[dict], list[dict]]:
    """``(kept, held_out)``: whole articles, drawn at random, are held out until they hold at least
    ``n`` questions; no article is in both. Raises ValueError when that would leave nothing to keep."""
    articles = _by_article(records)
    order = sorted(articles)
    random.Random(seed).shuffle(order)
    held, count = set(), 0
    for title in order:
        if count >= n:
            break
        held.add(title)
        count += len(articles[title])
    if len(held) == len(articles):
        raise ValueError(f"holding out {n} questions in whole articles leaves no training data "
                         f"({len(records)} questions in {len(articles)} article(s))")
    kept = [r for r in records if r.get("title", "") not in held]
    return kept, [r for r in records if r.get("title", "") in held]


def absent_articles(records: list[dict], share: float, seed: int) -> set[str]:
    """A seeded ``share`` of the records' article titles, to leave out of a library: their questions
    teach and test "the library does not hold it"."""
    if not 0 <= share < 1:
        raise ValueError(f"--absent-articles must be in [0, 1), got {share:g}")
    titles = sorted({record.get("title", "") for record in records})
    absent = set(random.Random(seed).sample(titles, round(share * len(titles))))
    if len(absent) == len(titles):
        raise ValueError(f"--absent-articles {share:g} leaves no article in the library")
    return absent
