"""A tiny model trained with synthesised negatives says "not in this document", via answer_questions.

The model is conftest's ``abstaining_run`` (trained once per test session); test_serve_library serves
it and checks that the service abstains as these do.
"""

import json

import pytest

from conftest import V2_DATA
from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config, read_squad
from qa_common.calibration import uncalibrated


@pytest.fixture(scope="module")
def records():
    return read_squad(V2_DATA)


def test_training_with_negatives_exports_a_model_that_abstains_at_its_best_threshold(abstaining_run):
    output, metrics = abstaining_run
    assert metrics["train_examples"] > 13  # the synthesised negatives were trained on
    # --cheap-dropout and --gradient-checkpointing are off by default (test_train_job: on)
    assert metrics["training_dropout"] == "torch" and metrics["gradient_checkpointing"] is False
    saved = load_qa_config(output / "model")
    assert saved.version_2_with_negative is True  # switched on by the negatives, not by a flag
    # Stored on the calibrated scale: the same decisions as the raw threshold with the best F1.
    assert saved.no_answer_threshold == metrics["no_answer_threshold"]
    assert uncalibrated(saved).no_answer_threshold == pytest.approx(metrics["best_f1_thresh"])
    assert metrics["calibration"]["questions"] == metrics["eval_examples"]
    assert metrics["f1"] == pytest.approx(metrics["best_f1"])
    for name in ("HasAns_f1", "NoAns_f1", "HasAns_total", "NoAns_total"):
        assert name in metrics
    assert metrics["NoAns_total"] == 5 and metrics["NoAns_exact"] == 100.0
    card = (output / "model" / "README.md").read_text()
    assert "This model abstains" in card and f"{saved.no_answer_threshold:.4f}" in card
    assert "| unanswerable (NoAns) | 5 |" in card


def test_answer_questions_abstains_on_the_unanswerable_questions(abstaining_run, records):
    output, metrics = abstaining_run
    model, tokenizer = load_model_and_tokenizer(str(output / "model"))
    config = load_qa_config(output / "model")
    answers = answer_questions(model, tokenizer, [Question(r["question"], r["context"]) for r in records], config)
    predictions = {record["id"]: best["answer"] for record, [best] in zip(records, answers)}
    # Decoding with the stored threshold gives exactly what evaluation scored.
    assert predictions == json.loads((output / "predictions.json").read_text())
    for record, [best] in zip(records, answers):
        if not record["answers"]["text"]:
            assert (best["answer"], best["start"], best["end"]) == ("", -1, -1), record["id"]
            assert best["no_answer_probability"] > config.no_answer_threshold
            assert best["score"] > 0
    assert metrics["HasAns_f1"] > 50  # and it still answers most answerable ones

    # allow_no_answer=False: the spans, ranked as before; the null answer is never among them.
    unanswerable = next(r for r in records if not r["answers"]["text"])
    [[with_null], [without_null]] = answer_questions(
        model, tokenizer, [Question(unanswerable["question"], unanswerable["context"], top_k=1),
                           Question(unanswerable["question"], unanswerable["context"], top_k=1, allow_no_answer=False)],
        config,
    )
    assert with_null["start"] == -1 and without_null["start"] >= 0
    assert without_null["no_answer_probability"] == pytest.approx(with_null["no_answer_probability"])
