"""Open-domain evaluation (python -m library_job evaluate): the fixture's paragraphs as a library, every
question asked of all of it, with the abstaining tiny model as the reader."""

import json

import pytest

from conftest import FIXTURES
from qa_common import PassagesQuestion, Question, answer_questions, load_model_and_tokenizer, load_qa_config, read_squad
from qa_common.calibration import answered_at_precision, expected_calibration_error
from qa_common.metric import score_answer
from library_job import evaluate
from library_job.__main__ import main as library_job


def test_every_question_is_asked_of_the_whole_library_and_scored_both_ways(abstaining_run, local_ray, tmp_path):
    model_dir = abstaining_run[0] / "model"
    data = FIXTURES / "tiny-squad.json"
    assert library_job(["evaluate", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
                        "--passages", "2", "--concurrency", "1"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    records = read_squad(data)
    assert metrics["questions"] == len(records) and metrics["paragraphs"] == 4
    for mode in ("hybrid", "dense", "lexical"):
        recalls = [metrics[f"{mode}_recall@{k}"] for k in (1, 5, 20)]
        assert recalls == sorted(recalls) and recalls[-1] == 1.0  # four paragraphs: all are in the top 20
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "out" / "answers.jsonl").read_text().splitlines())}

    # Scored as the reader answers: with the gold paragraph alone, and over the passages the hybrid search read.
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    config = load_qa_config(model_dir)
    documents = evaluate.paragraph_documents(records)
    alone = answer_questions(model, tokenizer, [Question(r["question"], r["context"]) for r in records], config)
    read = answer_questions(model, tokenizer, [PassagesQuestion(r["question"], tuple(
        documents[name] for name in rows[r["id"]]["read"])) for r in records], config)
    gold_f1 = [score_answer(a[0]["answer"], r["answers"]["text"])["f1"] for r, a in zip(records, alone)]
    library_f1 = [score_answer(a[0]["answer"], r["answers"]["text"])["f1"] for r, a in zip(records, read)]
    assert metrics["gold_paragraph_f1"] == pytest.approx(100 * sum(gold_f1) / len(records), abs=0.01)
    assert metrics["f1"] == pytest.approx(100 * sum(library_f1) / len(records), abs=0.01)
    assert metrics["gold_paragraph_f1"] > 50  # the tiny model learnt these questions
    # The served score end to end: calibration error and selective answering from the answers' own scores.
    scores = [rows[r["id"]]["score"] if rows[r["id"]]["answer"] else 0.0 for r in records]
    right = [rows[r["id"]]["exact_match"] == 1 for r in records]
    assert metrics["score_ece"] == pytest.approx(expected_calibration_error(scores, right), abs=1e-4)
    assert metrics["answered_at_80_precision"] == pytest.approx(answered_at_precision(scores, right, 0.8), abs=1e-4)
    assert sum(b["count"] for b in metrics["score_reliability"]) == len(records)
    assert (tmp_path / "out" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    for record in records:
        row = rows[record["id"]]
        assert len(row["read"]) == 2 and row["document"] == next(n for n, t in documents.items() if t == record["context"])
        assert (row["hybrid_rank"] == 1) == (row["read"][0] == row["document"])

    assert library_job(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "none.json"),
                        "--output", str(tmp_path / "x")]) == 2
