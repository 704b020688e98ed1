import json

import pytest

from conftest import FIXTURES
from qa_common import evaluate_answers, normalize_answer, read_squad, score_answer, squad_metrics, squad_v2_metrics


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


# --- SQuAD 2.0: against the official v2.0 evaluation script ------------------------------------


def official_v2_evaluation(dataset, preds, na_probs, na_prob_thresh):
    """The official SQuAD v2.0 script's evaluation (evaluate-v2.0.py, main() without the plots), as the oracle."""
    import collections
    import re
    import string

    def normalize_answer(s):
        def remove_articles(text):
            return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)

        return white_space_fix(remove_articles(remove_punc(s.lower())))

    def get_tokens(s):
        return normalize_answer(s).split() if s else []

    def compute_exact(a_gold, a_pred):
        return int(normalize_answer(a_gold) == normalize_answer(a_pred))

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    qid_to_has_ans = {qa["id"]: bool(qa["answers"]) for a in dataset for p in a["paragraphs"] for qa in p["qas"]}
    exact_raw, f1_raw = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
                exact_raw[qa["id"]] = max(compute_exact(a, preds[qa["id"]]) for a in gold_answers)
                f1_raw[qa["id"]] = max(compute_f1(a, preds[qa["id"]]) for a in gold_answers)

    def apply_no_ans_threshold(scores):
        return {qid: float(not qid_to_has_ans[qid]) if na_probs[qid] > na_prob_thresh else s for qid, s in scores.items()}

    def make_eval_dict(exact_scores, f1_scores, qid_list=None):
        qid_list = qid_list or list(exact_scores)
        total = len(qid_list)
        return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
                "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}

    def find_best_thresh(scores):
        cur_score = best_score = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            if qid not in scores:
                continue
            if qid_to_has_ans[qid]:
                diff = scores[qid]
            else:
                diff = -1 if preds[qid] else 0
            cur_score += diff
            if cur_score > best_score:
                best_score, best_thresh = cur_score, na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    exact_thresh, f1_thresh = apply_no_ans_threshold(exact_raw), apply_no_ans_threshold(f1_raw)
    out = make_eval_dict(exact_thresh, f1_thresh)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in qid_to_has_ans.items() if v == wanted]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in make_eval_dict(exact_thresh, f1_thresh, qids).items()})
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(exact_raw)
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(f1_raw)
    return out


V2_DATA = FIXTURES / "tiny-squad-v2.json"


def _v2_case():
    dataset = json.loads(V2_DATA.read_text())["data"]
    records = read_squad(V2_DATA)
    references = {r["id"]: r["answers"]["text"] for r in records}
    # Hand-made: some right, some partly right, some wrong; spans for some unanswerable questions,
    # "" for others and for one answerable one; no-answer probabilities with a tie.
    predictions = {qid: golds[0] if golds else "" for qid, golds in references.items()}
    predictions.update({"hh-1": "hand hygiene is the", "wa-2": "INR", "st-2": "", "hh-x1": "vitamin K",
                        "wa-x1": "alcohol", "st-x1": "oral"})
    na_probs = {qid: round(0.05 * (i % 7) + 0.1, 2) for i, qid in enumerate(references)}
    na_probs.update({"st-2": 0.9, "hh-x1": 0.35, "wa-x1": 0.8, "st-x1": 0.35, "dc-x1": 0.95})
    return dataset, references, predictions, na_probs


@pytest.mark.parametrize("na_prob_thresh", [1.0, 0.5, 0.3, 0.0])
def test_v2_metrics_equal_the_official_script(na_prob_thresh):
    dataset, references, predictions, na_probs = _v2_case()
    ours = squad_v2_metrics(predictions, references, na_probs, na_prob_thresh)
    official = official_v2_evaluation(dataset, predictions, na_probs, na_prob_thresh)
    assert ours.pop("missing") == 0
    assert ours.keys() == official.keys()
    for name, value in official.items():
        assert ours[name] == pytest.approx(value), name


def test_v2_metrics_by_hand():
    references = {"a": ["blood clotting"], "b": ["vitamin K"], "c": [], "d": []}
    predictions = {"a": "blood clotting", "b": "vitamin", "c": "", "d": "warfarin"}
    na_probs = {"a": 0.1, "b": 0.6, "c": 0.7, "d": 0.4}
    metrics = squad_v2_metrics(predictions, references, na_probs)
    assert metrics["HasAns_exact"] == 50.0 and metrics["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert metrics["NoAns_exact"] == metrics["NoAns_f1"] == 50.0  # "" on c is right, a span on d is wrong
    assert metrics["total"] == 4 and metrics["HasAns_total"] == metrics["NoAns_total"] == 2
    # Abstaining above 0.1 answers only a: 1 (a) + 0 (b) + 1 (c) + 1 (d) of 4, better than any other cut.
    assert metrics["best_f1"] == pytest.approx(75.0) and metrics["best_f1_thresh"] == 0.1
    assert squad_v2_metrics(predictions, references, na_probs, 0.1)["f1"] == pytest.approx(75.0)


def test_v2_missing_predictions_score_zero_and_unknown_ids_are_an_error():
    references = {"a": ["x"], "b": []}
    metrics = squad_v2_metrics({"a": "x"}, references)
    assert metrics["missing"] == 1 and metrics["exact"] == 50.0 and metrics["NoAns_exact"] == 0.0
    with pytest.raises(ValueError, match="not in the data"):
        squad_v2_metrics({"zz": ""}, references)


def test_evaluation_chooses_the_best_f1_threshold_and_abstains_at_it():
    references = {"a": ["blood clotting"], "b": ["vitamin K"], "c": [], "d": []}
    answers = {"a": ("blood clotting", 0.1), "b": ("vitamin", 0.6), "c": ("warfarin", 0.7), "d": ("warfarin", 0.4)}
    answers = {q: {"answer": text, "no_answer_probability": p} for q, (text, p) in answers.items()}
    predictions, metrics = evaluate_answers(answers, references, version_2_with_negative=True)
    assert metrics["no_answer_threshold"] == metrics["best_f1_thresh"] == 0.1
    assert metrics["f1"] == metrics["best_f1"] == pytest.approx(75.0)
    assert predictions == {"a": "blood clotting", "b": "", "c": "", "d": ""}
    assert metrics["exact_match"] == metrics["exact"]
    # A model that always answers is scored as such, with the v2 metric on v2 data.
    predictions, metrics = evaluate_answers(answers, references, version_2_with_negative=False)
    assert "no_answer_threshold" not in metrics and metrics["NoAns_f1"] == 0.0
    assert predictions == {q: a["answer"] for q, a in answers.items()}
    # v1 data, a model that always answers: the v1.1 metric, as before.
    v1 = {"a": ["blood clotting"], "b": ["vitamin K"]}
    predictions, metrics = evaluate_answers({q: answers[q] for q in v1}, v1, version_2_with_negative=False)
    assert metrics == squad_metrics(predictions, v1)
