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
