import pytest

from qa_common import normalize_answer, score_answer, squad_metrics


def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Heart's\tpump, an organ! ") == "hearts pump organ"
    assert normalize_answer("theatre") == "theatre"  # 'the' only as a whole word


def test_articles_and_punctuation_do_not_break_exact_match():
    assert score_answer("the INR.", ["INR"])["exact_match"] == 1.0


def test_f1_precision_recall_by_hand():
    # prediction tokens: between 2 and 3 units ; gold: between 2 and 3 -> shared 4
    scores = score_answer("between 2 and 3 units", ["between 2 and 3"])
    assert scores["exact_match"] == 0.0
    assert scores["precision"] == pytest.approx(4 / 5)
    assert scores["recall"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(2 * 0.8 / 1.8)


def test_best_of_several_gold_answers():
    scores = score_answer("Clostridioides difficile", ["the spores of Clostridioides difficile", "C. difficile"])
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # vs 'spores of clostridioides difficile'
    assert score_answer("C difficile", ["spores", "C. difficile"])["exact_match"] == 1.0


def test_empty_prediction_scores_zero():
    assert score_answer("", ["vitamin K"]) == {"exact_match": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_corpus_metrics_in_percent_with_missing_questions():
    references = {"q1": ["vitamin K"], "q2": ["arm weakness"], "q3": ["four hours"], "q4": ["a brain scan"]}
    metrics = squad_metrics({"q1": "Vitamin K.", "q2": "weakness", "q3": "nothing"}, references)
    assert metrics["total"] == 4 and metrics["missing"] == 1
    assert metrics["exact_match"] == pytest.approx(25.0)
    assert metrics["f1"] == pytest.approx((1.0 + 2 / 3) / 4 * 100)
    assert metrics["precision"] == pytest.approx(50.0)
    assert metrics["recall"] == pytest.approx(37.5)


def test_unknown_prediction_ids_are_an_error():
    with pytest.raises(ValueError, match="not in the data: 'zz'"):
        squad_metrics({"zz": "x"}, {"q1": ["y"]})
