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

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)  # a table that deletes it
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_NO_PUNCTUATION)
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


def question_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """One question's scores (0-1) under both metrics.

    v1.1 (answerable questions only): ``exact_match``, ``f1``, ``precision``, ``recall``, the best over
    the gold answers. v2.0: ``v2_exact`` and ``v2_f1``, the official script's per-question scores (a
    question without gold answers is right only when the prediction is empty after normalisation).
    Both commands that report SQuAD metrics (``qa_common.evaluate`` and ``train_job.predict``) add
    these up with :class:`MetricTotals`.
    """
    scores = score_answer(prediction, golds) if golds else {}
    kept = [gold for gold in golds if normalize_answer(gold)] or [""]
    scores["v2_exact"] = max(_v2_exact(gold, prediction) for gold in kept)
    scores["v2_f1"] = max(_v2_f1(gold, prediction) for gold in kept)
    return scores


V1_NAMES = ("exact_match", "f1", "precision", "recall")


class MetricTotals:
    """Sums of :func:`question_scores` by answerable / unanswerable, turned into the corpus metrics in
    percent, as the official scripts report them. Adds questions one at a time (a question without a
    prediction scores 0 and counts in ``missing``), so a stream of answers never needs to be held."""

    def __init__(self):
        self.sums: Counter = Counter()
        self.missing = 0

    def add(self, scores: Mapping[str, float] | None, *, answerable: bool) -> None:
        """One question's :func:`question_scores`, or None when it has no prediction."""
        group = "HasAns" if answerable else "NoAns"
        self.sums[group, "total"] += 1
        if scores is None:
            self.missing += 1
            return
        for name, value in scores.items():
            self.sums[group, name] += value

    def metrics(self, *, version_2: bool) -> dict:
        """SQuAD v1.1's metrics (``exact_match``, ``f1``, ``precision``, ``recall``), or v2.0's
        (``exact``, ``f1`` and their ``HasAns_``/``NoAns_`` groups); with ``total`` and ``missing``."""
        total = self.sums["HasAns", "total"] + self.sums["NoAns", "total"]
        if not total:
            raise ValueError("no reference questions to score")
        if not version_2:
            if self.sums["NoAns", "total"]:
                raise ValueError("SQuAD v1.1 metrics need every question to have a gold answer")
            result = {name: 100.0 * self.sums["HasAns", name] / total for name in V1_NAMES}
            return {**result, "total": int(total), "missing": self.missing}

        def summary(groups) -> dict:
            count = sum(self.sums[g, "total"] for g in groups)
            return {"exact": 100.0 * sum(self.sums[g, "v2_exact"] for g in groups) / count,
                    "f1": 100.0 * sum(self.sums[g, "v2_f1"] for g in groups) / count, "total": int(count)}

        result = summary(("HasAns", "NoAns"))
        for group in ("HasAns", "NoAns"):
            if self.sums[group, "total"]:
                result.update({f"{group}_{name}": value for name, value in summary((group,)).items()})
        return {**result, "missing": self.missing}


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """Corpus metrics in percent over every reference question, as the official script reports.

    ``predictions`` maps question ids to answer text, ``references`` question ids to gold answers.
    A question without a prediction scores 0 and is counted in ``missing``; a prediction for an
    unknown question id is an error.
    """
    _check_question_ids(predictions, references)
    totals = MetricTotals()
    for question_id, golds in references.items():
        if not golds:
            raise ValueError(f"question {question_id!r} has no gold answer: score SQuAD 2.0 data with squad_v2_metrics")
        totals.add(question_scores(predictions[question_id], golds) if question_id in predictions else None,
                   answerable=True)
    return totals.metrics(version_2=False)


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
    totals, exact_raw, f1_raw = MetricTotals(), {}, {}
    for question_id, golds in references.items():
        prediction = predictions.get(question_id)
        raw = question_scores(prediction, golds) if prediction is not None else {"v2_exact": 0.0, "v2_f1": 0.0}
        exact_raw[question_id], f1_raw[question_id] = raw["v2_exact"], raw["v2_f1"]
        if prediction is not None and probabilities[question_id] > na_prob_thresh:
            raw = question_scores("", golds)  # counted as empty: abstained
        totals.add({"v2_exact": raw["v2_exact"], "v2_f1": raw["v2_f1"]} if prediction is not None else None,
                   answerable=bool(golds))
    result = totals.metrics(version_2=True)
    if na_probs is not None:
        given = {q: predictions.get(q, "") for q in references}
        ordered = {q: probabilities[q] for q in na_probs if q in probabilities}
        ordered.update({q: p for q, p in probabilities.items() if q not in ordered})
        result["best_exact"], result["best_exact_thresh"] = _find_best_thresh(given, exact_raw, ordered, has_answer)
        result["best_f1"], result["best_f1_thresh"] = _find_best_thresh(given, f1_raw, ordered, has_answer)
    return result


def score_predictions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                      na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict:
    """The official metrics of answer texts: SQuAD v1.1's, or v2.0's when some question has no gold
    answer or no-answer probabilities are given."""
    if na_probs is None and not is_version_2(references):
        return squad_metrics(predictions, references)
    return squad_v2_metrics(predictions, references, na_probs, na_prob_thresh)


def evaluate_answers(
    answers: Mapping[str, dict], references: Mapping[str, Sequence[str]], *, version_2_with_negative: bool,
    threshold: float | None = None,
) -> tuple[dict[str, str], dict]:
    """``(predictions, metrics)`` for decoded answers, as training's evaluation reports them.

    ``answers`` maps question ids to the best *span* (decoded without abstention) with its
    ``no_answer_probability``. SQuAD 1.1 data and a model that always answers: the v1.1 metrics.
    Otherwise the SQuAD 2.0 metrics, and for a model that abstains (``version_2_with_negative``)
    at ``threshold``, by default the threshold with the best F1 -- the one the export stores, so
    ``f1`` equals ``best_f1`` and ``no_answer_threshold`` holds it (give the model's own threshold
    to score a trained model). Either way the headline metrics are ``exact_match`` and ``f1``.
    Predictions are the answer texts, empty where the model abstains.
    """
    texts = {question_id: answer["answer"] for question_id, answer in answers.items()}
    if not version_2_with_negative and not is_version_2(references):
        return texts, score_predictions(texts, references)
    na_probs = {question_id: answer["no_answer_probability"] for question_id, answer in answers.items()}
    if not version_2_with_negative:
        threshold = 1.0
    elif threshold is None:
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
