"""A library's answers use a threshold and calibration fitted over the library's own retrievals
(``python -m qa_common.calibration --over-passages``); a paragraph's answers keep their own."""

import itertools
import json
import math
import shutil

import pytest

from conftest import V2_DATA
from library_job.mine import group_records
from qa_common import PassagesQuestion, Question, answer_questions, load_model_and_tokenizer, load_qa_config, read_squad
from qa_common.calibration.__main__ import main as calibration
from qa_common.calibration import uncalibrated
from qa_common.calibration.passages import PASSAGE_RANK_WEIGHTS
from qa_common.config import FITTED_SETTINGS


def mined(records: list[dict]) -> list[dict]:
    """Every question read over every set of the fixture's paragraphs, one group each, labelled as
    ``library_job mine`` labels them: 18 questions x 15 sets, a third without their own paragraph."""
    paragraphs = sorted({r["context"] for r in records})
    sets = [s for size in range(1, len(paragraphs) + 1) for s in itertools.combinations(paragraphs, size)]
    return [record for question in records for n, passages in enumerate(sets)
            for record in group_records({**question, "id": f"{question['id']}~{n}"}, list(passages))]


def test_a_library_is_read_with_the_calibration_fitted_over_its_retrievals(abstaining_run, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(abstaining_run[0] / "model", model_dir)
    one_paragraph = load_qa_config(model_dir)
    records = read_squad(V2_DATA)
    data = tmp_path / "mined.json"
    data.write_text(json.dumps({"data": mined(records)}))

    assert calibration([str(model_dir), "--validation-file", str(data), "--over-passages"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    config = load_qa_config(model_dir)
    assert config.replace(passages_calibration={}) == one_paragraph  # a paragraph's settings untouched
    assert set(config.passages_calibration) == set(FITTED_SETTINGS)
    assert report["questions"] == 18 * 15 and 0 < report["unanswerable"] < report["questions"]
    assert report["no_answer_ece_after"] < report["no_answer_ece_before"]
    # The weight of the search's order and the threshold are the best over these questions: never worse
    # than ignoring the order, or than the one-paragraph threshold there.
    by_weight = report["f1_by_passage_rank_weight"]
    assert set(by_weight) == {str(w) for w in PASSAGE_RANK_WEIGHTS}
    weight = config.passages_calibration["passage_rank_weight"]
    assert weight == report["passage_rank_weight"] and by_weight[str(weight)] == max(by_weight.values())
    assert report["f1_at_passages_threshold"] == pytest.approx(by_weight[str(weight)], abs=1e-4)
    assert report["f1_at_passages_threshold"] >= report["f1_at_one_paragraph_threshold"]
    # The logistic confidence is kept exactly when it ranked right answers first better on held-out articles;
    # a map of the share fitted on one paragraph is no map of it.
    kept, selective = config.passages_calibration["answer_confidence"], report["selective_cross_fitted"]
    assert report["answer_confidence"] == ("logistic model" if kept else "softmax share")
    assert bool(kept) == (selective["logistic model"]["risk_coverage_area"] < selective["softmax share"]["risk_coverage_area"])
    errors = report["score_ece_cross_fitted"]
    assert set(errors) == {"none", "refit"} | (set() if kept else {"one_paragraph"})
    assert report["score_map"] == min(errors, key=errors.get)

    # Read over passages, the answer is decided and scored with the passages' settings.
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    question = records[0]
    over = PassagesQuestion(question["question"], tuple(sorted({r["context"] for r in records})))
    alone = Question(question["question"], question["context"])
    passages = config.over_passages()
    # The report describes the map kept, on the answers as served.
    assert report["score_knots"] == len(passages.score_calibration)
    assert (report["score_ece_after"] == report["score_ece_before"]) == (report["score_map"] == "none")
    assert passages.no_answer_scale == config.passages_calibration["no_answer_scale"] != one_paragraph.no_answer_scale
    [[raw]] = answer_questions(model, tokenizer, [over], uncalibrated(one_paragraph))
    [[served]] = answer_questions(model, tokenizer, [over], config)
    logit = math.log(raw["no_answer_probability"] / (1 - raw["no_answer_probability"]))
    assert served["no_answer_probability"] == pytest.approx(
        1 / (1 + math.exp(-(passages.no_answer_scale * logit + passages.no_answer_bias))))
    assert (served["answer"] == "") == (served["no_answer_probability"] > passages.no_answer_threshold)
    assert answer_questions(model, tokenizer, [alone], config) == answer_questions(model, tokenizer, [alone], one_paragraph)

    assert calibration([str(model_dir), "--validation-file", str(V2_DATA), "--over-passages"]) == 2
    assert "library_job mine" in capsys.readouterr().err
