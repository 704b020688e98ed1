"""bench.simulated_clinicians: the feedback benchmark's split of documents and its clinicians' ratings."""

import pytest

from bench.simulated_clinicians import GROUPS, rating, score, split


@pytest.fixture
def library():
    documents = {f"doc-{d}.txt": f"Paragraph {d} says something." for d in range(6)}
    records = [{"id": f"{d}-{q}", "question": f"q{q} of {d}?", "context": f"Paragraph {d} says something.",
                "answers": {"text": ["something"], "answer_start": [0]}} for d in range(6) for q in range(4)]
    return records, documents


def test_feedback_comes_from_half_the_documents_and_the_held_out_half_stays_unseen(library):
    records, documents = library
    groups = split(records, documents, feedback_share=0.5, eval_questions=None, seed=0)
    trained = {r["document"] for r in groups["feedback"]}
    held_out = {r["document"] for r in groups[GROUPS[1]]}
    assert len(trained) == 3 and trained.isdisjoint(held_out) and trained | held_out == set(documents)
    assert {r["document"] for r in groups[GROUPS[0]]} == trained  # new questions about the trained documents
    assert len(groups["feedback"]) == len(groups[GROUPS[0]]) == 6  # half of each trained document's four
    ids = [r["id"] for group in groups.values() for r in group]
    assert sorted(ids) == sorted(r["id"] for r in records)  # each question in exactly one group
    assert split(records, documents, feedback_share=0.5, eval_questions=None, seed=0) == groups
    assert split(records, documents, feedback_share=0.5, eval_questions=None, seed=1) != groups
    capped = split(records, documents, feedback_share=0.5, eval_questions=4, seed=0)
    assert [len(capped[name]) for name in GROUPS] == [4, 4] and capped["feedback"] == groups["feedback"]


def answer(text: str, passage: str) -> dict:
    return {"answer": text, "passage": passage}


def test_a_clinician_marks_right_or_selects_the_gold_words_in_a_shown_passage():
    record = {"answers": {"text": ["warfarin"]}}
    passages = ["He was given aspirin.", "On admission he was given warfarin daily."]
    right = rating(record, {"json": {"answers": [answer("Warfarin.", passages[1])]}})
    assert right == {"verdict": "right", "answer": 0}
    wrong = rating(record, {"json": {"answers": [answer("aspirin", passages[0]), answer("daily", passages[1])]}})
    start, end = wrong["correction"]["start"], wrong["correction"]["end"]
    assert wrong["verdict"] == "wrong" and wrong["answer"] == 1 and passages[1][start:end] == "warfarin"
    unseen = rating(record, {"json": {"answers": [answer("aspirin", passages[0])]}})
    assert unseen == {"verdict": "wrong", "answer": 0}  # no words to select: none of the shown passages has them
    declined = rating(record, {"json": {"answers": [answer("", None)]}})
    assert declined == {"verdict": "wrong", "answer": 0}


def test_end_to_end_scores_count_declines_and_errors_as_wrong():
    records = [{"answers": {"text": ["warfarin"]}}] * 3
    responses = [{"status": 200, "json": {"answers": [answer("warfarin", "")]}},
                 {"status": 200, "json": {"answers": [answer("", None)]}},
                 {"status": 503, "json": {}}]
    scores = score(records, responses)
    assert scores["questions"] == 3 and scores["errors"] == 1
    assert scores["exact_match"] == pytest.approx(100 / 3) and scores["f1"] == pytest.approx(100 / 3)
