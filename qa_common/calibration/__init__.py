"""Calibrated scores: an answer scored 0.8 should be right about 8 times in 10.

Two calibrators, fitted on a validation split and stored in the model's ``qa_config.json``
(:class:`qa_common.QAConfig`), so every place that decodes answers applies them:

- **score** (the answer's softmax probability among the question's candidates): isotonic
  regression (Zadrozny & Elkan, 2002) of whether the top answer is exactly right (the null answer
  is right when the question has no answer) on its softmax score, stored as the knots of a
  non-decreasing piecewise-linear map (``score_calibration``). Non-decreasing, so the ranking,
  and with it every answer, is unchanged. One temperature could not do it: this model family is
  under-confident at every score (accuracy above confidence in every bin), which a temperature
  cannot lift at both ends; on SQuAD dev the isotonic map reached an expected calibration error of
  0.017-0.024 on held-out articles where a temperature reached 0.051 (ACCURACY.md). It needs some
  hundreds of questions (:data:`MIN_SCORE_QUESTIONS`); with fewer the score stays uncalibrated.
- **no_answer_probability**: Platt scaling, ``sigmoid(a * (null_score - best_span_score) + b)``,
  fitted by logistic regression on whether the question is unanswerable; it needs validation data
  holding both kinds of question (otherwise a = 1, b = 0). The no-answer threshold is carried into
  the calibrated scale, so the model abstains on exactly the same questions as before.

A question asked of a library is read over its top retrieved passages at once, where distractor
passages and "the library does not hold it" change both the score and the null score: its
threshold and calibrators are fitted apart, in that setting (``passages_calibration``,
:func:`calibrate_passages`, on questions mined from a library by ``python -m library_job mine``),
and decoding over passages uses them (:meth:`qa_common.QAConfig.over_passages`). There the score
may be a logistic model of the answer's features (:mod:`qa_common.confidence`) in place of its share
of the softmax, kept where it ranks right answers first better on held-out articles.

``python -m qa_common.calibration MODEL_DIR --validation-file FILE [--over-passages]`` (re)fits a
model directory's calibration on a SQuAD-format file and prints the expected calibration error
before and after on it. Training (``train_job``) runs the one-paragraph fit on its validation split
when it exports a model.

The measures (ECE, reliability bins, selective answering) are in ``measures``, the one-paragraph fit
in ``paragraphs``, the fit over passages in ``passages``, the command in ``__main__``.
"""
from qa_common.calibration.measures import answered_at_precision, expected_calibration_error, reliability
from qa_common.calibration.paragraphs import (calibrate, calibrated_threshold, describe, fit, fit_no_answer_scaling,
                                              fit_score_map, score_outcomes, top_answer_correct, uncalibrated)
from qa_common.calibration.passages import calibrate_passages, choose_score_map, passage_groups

__all__ = ["answered_at_precision", "calibrate", "calibrate_passages", "calibrated_threshold", "choose_score_map",
           "describe", "expected_calibration_error", "fit", "fit_no_answer_scaling", "fit_score_map", "passage_groups",
           "reliability", "score_outcomes", "top_answer_correct", "uncalibrated"]
