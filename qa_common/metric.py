"""The SQuAD metrics: v1.1 (exact match and token F1, with precision and recall) and v2.0.

Normalisation follows the official evaluation scripts: lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace. Each prediction is scored against every gold answer and
the best score is kept, per metric.

SQuAD 2.0 (:func:`squad_v2_metrics`) is a port of the official v2.0 script: an unanswerable
question (no gold answer) is right only when the prediction is empty; a prediction whose
no-answer probability exceeds ``na_prob_thresh`` counts as empty; ``best_f1``/``best_f1_thresh``
is the threshold on the no-answer probability that maximises F1 (``find_best_thresh``). The
threshold means the same at decode time: :mod:`qa_common.decoding` answers "not in this document"
when ``no_answer_probability > QAConfig.no_answer_threshold``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def precision_recall_f1(prediction: str, gold: str) -> tuple[float, float, float]:
    """Token-overlap precision, recall and F1 of one prediction against one gold answer."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0, 0.0, 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return precision, recall, 2 * precision * recall / (precision + recall)


def score_answer(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """Best exact match, F1, precision and recall of one prediction over its gold answers."""
    if not golds:
        raise ValueError("an answer needs at least one gold answer to be scored")
    prf = [precision_recall_f1(prediction, gold) for gold in golds]
    return {
        "exact_match": max(exact_match(prediction, gold) for gold in golds),
        "precision": max(p for p, _, _ in prf),
        "recall": max(r for _, r, _ in prf),
        "f1": max(f for _, _, f in prf),
    }


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Corpus metrics in percent over every reference question, as the official script reports.

    ``predictions`` maps question ids to answer text, ``references`` question ids to gold answers.
    A question without a prediction scores 0 and is counted in ``missing``; a prediction for an
    unknown question id is an error.
    """
    _check_question_ids(predictions, references)
    totals = Counter()
    for question_id, golds in references.items():
        if question_id in predictions:
            totals.update(score_answer(predictions[question_id], golds))
    count = len(references)
    result = {name: 100.0 * totals[name] / count for name in ("exact_match", "f1", "precision", "recall")}
    result.update(total=count, missing=sum(1 for question_id in references if question_id not in predictions))
    return result


# --- SQuAD 2.0 ------------------------------------------------------------------------------------


def is_version_2(references: Mapping[str, Sequence[str]]) -> bool:
    """True when some question has no gold answer (SQuAD 2.0 data)."""
    return any(not golds for golds in references.values())


def _v2_exact(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def _v2_f1(gold: str, prediction: str) -> float:
    """Token F1; when either side is empty, 1 if both are and 0 otherwise."""
    gold_tokens, predicted_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not predicted_tokens:
        return float(gold_tokens == predicted_tokens)
    return precision_recall_f1(prediction, gold)[2]


def _find_best_thresh(predictions, scores, na_probs, has_answer) -> tuple[float, float]:
    """The official ``find_best_thresh``: sweep the no-answer threshold from "abstain on everything" up."""
    current = best = sum(1 for question_id in scores if not has_answer[question_id])
    best_thresh = 0.0
    for question_id in sorted(na_probs, key=lambda q: na_probs[q]):
        if question_id not in scores:
            continue
        if has_answer[question_id]:
            current += scores[question_id]
        elif predictions.get(question_id):
            current -= 1
        if current > best:
            best, best_thresh = current, na_probs[question_id]
    return 100.0 * best / len(scores), best_thresh


def squad_v2_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """The official SQuAD 2.0 metrics in percent: ``exact``, ``f1``, ``total``, ``HasAns_*``, ``NoAns_*``.

    ``references`` maps question ids to gold answers (empty for an unanswerable question);
    ``na_probs`` question ids to no-answer probabilities (default 0). A prediction counts as empty
    when its no-answer probability exceeds ``na_prob_thresh``. With ``na_probs``, also
    ``best_exact``/``best_f1`` and the thresholds that reach them. A question without a prediction
    scores 0 (counted in ``missing``); a prediction for an unknown question id is an error.
    """
    _check_question_ids(predictions, references)
    has_answer = {question_id: bool(golds) for question_id, golds in references.items()}
    probabilities = {question_id: (na_probs or {}).get(question_id, 0.0) for question_id in references}
    exact_raw, f1_raw = {}, {}
    for question_id, golds in references.items():
        golds = [gold for gold in golds if normalize_answer(gold)] or [""]
        prediction = predictions.get(question_id)
        exact_raw[question_id] = 0.0 if prediction is None else max(_v2_exact(g, prediction) for g in golds)
        f1_raw[question_id] = 0.0 if prediction is None else max(_v2_f1(g, prediction) for g in golds)

    def thresholded(raw: dict) -> dict:
        return {q: float(not has_answer[q]) if probabilities[q] > na_prob_thresh else score for q, score in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

    def summary(question_ids: list) -> dict:
        count = len(question_ids)
        return {"exact": 100.0 * sum(exact[q] for q in question_ids) / count,
                "f1": 100.0 * sum(f1[q] for q in question_ids) / count, "total": count}

    result = summary(list(references))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        question_ids = [q for q in references if has_answer[q] == wanted]
        if question_ids:
            result.update({f"{prefix}_{name}": value for name, value in summary(question_ids).items()})
    if na_probs is not None:
        given = {q: predictions.get(q, "") for q in references}
        ordered = {q: probabilities[q] for q in na_probs if q in probabilities}
        ordered.update({q: p for q, p in probabilities.items() if q not in ordered})
        result["best_exact"], result["best_exact_thresh"] = _find_best_thresh(given, exact_raw, ordered, has_answer)
        result["best_f1"], result["best_f1_thresh"] = _find_best_thresh(given, f1_raw, ordered, has_answer)
    result["missing"] = sum(1 for question_id in references if question_id not in predictions)
    return result


def evaluate_answers(
    answers: Mapping[str, dict], references: Mapping[str, Sequence[str]], *, version_2_with_negative: bool
) -> tuple[dict[str, str], dict]:
    """``(predictions, metrics)`` for decoded answers, as training's evaluation reports them.

    ``answers`` maps question ids to the best *span* (decoded without abstention) with its
    ``no_answer_probability``. SQuAD 1.1 data and a model that always answers: the v1.1 metrics.
    Otherwise the SQuAD 2.0 metrics, and for a model that abstains (``version_2_with_negative``)
    at the threshold with the best F1 -- the one the export stores, so ``f1`` equals ``best_f1``
    and ``no_answer_threshold`` holds it. Either way the headline metrics are ``exact_match`` and
    ``f1``. Predictions are the answer texts, empty where the model abstains.
    """
    texts = {question_id: answer["answer"] for question_id, answer in answers.items()}
    if not version_2_with_negative and not is_version_2(references):
        return texts, squad_metrics(texts, references)
    na_probs = {question_id: answer["no_answer_probability"] for question_id, answer in answers.items()}
    threshold = 1.0
    if version_2_with_negative:
        threshold = squad_v2_metrics(texts, references, na_probs)["best_f1_thresh"]
    metrics = squad_v2_metrics(texts, references, na_probs, na_prob_thresh=threshold)
    metrics["exact_match"] = metrics["exact"]  # the headline names are exact_match and f1 for both versions
    if version_2_with_negative:
        metrics["no_answer_threshold"] = threshold
    predictions = {q: "" if na_probs[q] > threshold else text for q, text in texts.items()}
    return predictions, metrics


def _check_question_ids(predictions: Mapping, references: Mapping) -> None:
    """Every prediction names a known question, and there is something to score."""
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} prediction id(s) are not in the data: {shown}")
    if not references:
        raise ValueError("no reference questions to score")
