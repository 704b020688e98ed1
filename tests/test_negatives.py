"""Synthesised unanswerable questions: a question on a paragraph that holds none of its answers."""

import pytest

from conftest import FIXTURES
from qa_common import normalize_answer, read_squad, synthesise_negatives

RECORDS = read_squad(FIXTURES / "tiny-squad.jsonl")


def test_negatives_never_contain_a_gold_answer_of_their_question():
    negatives = synthesise_negatives(RECORDS, 2, seed=3)
    source = {r["id"]: r for r in RECORDS}
    assert len(negatives) > len(RECORDS)  # most questions found two other paragraphs
    for negative in negatives:
        original = source[negative["id"].rsplit("-neg", 1)[0]]
        assert negative["question"] == original["question"]
        assert negative["context"] != original["context"]
        assert negative["answers"] == {"text": [], "answer_start": []}
        for gold in original["answers"]["text"]:
            assert normalize_answer(gold) not in normalize_answer(negative["context"])
    assert len({n["id"] for n in negatives} | {r["id"] for r in RECORDS}) == len(negatives) + len(RECORDS)


def test_a_paragraph_holding_the_answer_text_is_never_chosen():
    # Three paragraphs; the question's answer also occurs in the second, so only the third may be used.
    records = [
        {"id": "q", "title": "a", "context": "Warfarin is an anticoagulant.", "question": "What is warfarin?",
         "answers": {"text": ["an anticoagulant"], "answer_start": [12]}},
        {"id": "r", "title": "b", "context": "Heparin is AN  anticoagulant too.", "question": "What is heparin?",
         "answers": {"text": ["Heparin"], "answer_start": [0]}},
        {"id": "s", "title": "c", "context": "Stroke needs a brain scan.", "question": "What does stroke need?",
         "answers": {"text": ["a brain scan"], "answer_start": [13]}},
    ]
    for seed in range(20):
        negatives = {n["id"]: n for n in synthesise_negatives(records, 1, seed=seed)}
        assert negatives["q-neg0"]["context"] == records[2]["context"]
        assert negatives["q-neg0"]["title"] == "c"


def test_seeded_ratio_and_other_paragraphs():
    assert synthesise_negatives(RECORDS, 1, seed=7) == synthesise_negatives(RECORDS, 1, seed=7)
    assert synthesise_negatives(RECORDS, 1, seed=7) != synthesise_negatives(RECORDS, 1, seed=8)
    assert synthesise_negatives(RECORDS, 0) == []
    assert len(synthesise_negatives(RECORDS, 0.5, seed=1)) == round(0.5 * len(RECORDS))
    # Questions paired with paragraphs of another data set (how bench/abstention_accuracy.py builds its test).
    elsewhere = [{"context": "Nothing here answers anything about medicine.", "title": "other"}]
    negatives = synthesise_negatives(RECORDS[:3], 1, paragraphs=elsewhere)
    assert [n["context"] for n in negatives] == [elsewhere[0]["context"]] * 3
    # Unanswerable records are not sources of negatives.
    assert synthesise_negatives(negatives, 1, paragraphs=RECORDS) == []
    with pytest.raises(ValueError, match="negative ratio"):
        synthesise_negatives(RECORDS, -1)


ARTICLES = [
    {"id": f"{title}{p}", "title": title, "context": f"{title} paragraph {p} says {title}{p} facts.",
     "question": f"What does {title}{p} say?", "answers": {"text": [f"{title}{p} facts"], "answer_start": [len(f"{title} paragraph {p} says ")]}}
    for title in ("alpha", "beta", "gamma") for p in range(4)
]


@pytest.mark.parametrize("source", ["article", "other"])
def test_negatives_come_from_the_same_article_or_another_one(source):
    negatives = synthesise_negatives(ARTICLES, 2, seed=5, source=source)
    assert len(negatives) == 2 * len(ARTICLES)
    original = {r["id"]: r for r in ARTICLES}
    for negative in negatives:
        question = original[negative["id"].rsplit("-neg", 1)[0]]
        assert (negative["title"] == question["title"]) == (source == "article")
        assert negative["context"] != question["context"]
        assert normalize_answer(question["answers"]["text"][0]) not in normalize_answer(negative["context"])


def test_mixed_negatives_take_both_and_unknown_sources_are_refused():
    negatives = synthesise_negatives(ARTICLES, 3, seed=2, source="mix")
    original = {r["id"]: r for r in ARTICLES}
    same = [n["title"] == original[n["id"].rsplit("-neg", 1)[0]]["title"] for n in negatives]
    assert 0 < sum(same) < len(same)
    with pytest.raises(ValueError, match="article, other, mix"):
        synthesise_negatives(ARTICLES, 1, source="anywhere")
