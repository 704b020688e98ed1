import numpy as np

from qa_common import NO_ANSWER, QAConfig, decode_predictions, decode_spans

CONTEXT = "Warfarin slows blood clotting in the body."
# token:          [CLS] what  ?   [SEP] Warfarin slows  blood  clotting  in     the    body   .     [SEP]
OFFSETS = np.array([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [0, 8], [9, 14], [15, 20], [21, 29], [30, 32],
                    [33, 36], [37, 41], [41, 42], [-1, -1]])


def _logits(starts: dict, ends: dict, length=len(OFFSETS)):
    start, end = np.zeros(length), np.zeros(length)
    for index, value in starts.items():
        start[index] = value
    for index, value in ends.items():
        end[index] = value
    return start[None], end[None]


def test_picks_the_best_sum_of_start_and_end_logits():
    start, end = _logits({6: 5.0, 4: 4.0}, {7: 5.0, 10: 1.0})
    best = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig())[0]
    assert best["answer"] == "blood clotting" and (best["start"], best["end"]) == (15, 29)
    assert CONTEXT[best["start"] : best["end"]] == best["answer"]
    assert 0.0 < best["score"] <= 1.0


def test_never_answers_with_question_or_special_tokens():
    start, end = _logits({1: 50.0, 0: 40.0, 5: 2.0}, {2: 50.0, 12: 40.0, 6: 2.0})
    best = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig())[0]
    assert best["answer"] == "slows blood"


def test_skips_end_before_start_and_spans_over_max_answer_length():
    start, end = _logits({8: 10.0, 5: 1.0}, {6: 10.0, 10: 3.0, 7: 2.0})
    # end(6) < start(8) is invalid; 8..10 (3 tokens) is over max_answer_length=2; 5..6 is best valid.
    best = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig(max_answer_length=2))[0]
    assert best["answer"] == "slows blood"
    assert decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig(max_answer_length=3))[0]["answer"] == "in the body"


def test_top_k_answers_are_ranked_and_distinct():
    start, end = _logits({4: 3.0, 6: 2.0}, {7: 3.0, 4: 2.5})
    answers = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig(), top_k=3)
    assert [a["answer"] for a in answers] == ["Warfarin slows blood clotting", "Warfarin", "blood clotting"]
    assert len({(a["start"], a["end"]) for a in answers}) == 3


def test_no_valid_span_gives_the_empty_answer():
    start, end = _logits({}, {})
    no_context = np.full_like(OFFSETS, -1)
    assert decode_spans(start, end, no_context[None], CONTEXT, QAConfig()) == [NO_ANSWER]


def test_windows_of_one_example_are_merged_and_duplicates_counted_once():
    # Window 0 sees "Warfarin slows blood"; window 1 sees "blood clotting ..." (token 6 shared).
    window_0 = OFFSETS.copy()
    window_0[7:12] = -1
    window_1 = OFFSETS.copy()
    window_1[4:6] = -1
    start_0, end_0 = _logits({4: 2.0}, {4: 2.0})
    start_1, end_1 = _logits({6: 4.0, 9: 1.0}, {7: 4.0, 10: 1.0})
    answers = decode_spans(
        np.vstack([start_0, start_1]), np.vstack([end_0, end_1]), np.stack([window_0, window_1]), CONTEXT,
        QAConfig(), top_k=20,
    )
    assert answers[0]["answer"] == "blood clotting"
    spans = [(a["start"], a["end"]) for a in answers]
    assert len(spans) == len(set(spans))
    assert (0, 8) in spans  # found only in window 0


def test_decode_predictions_groups_features_by_example_in_any_order():
    start_a, end_a = _logits({4: 5.0}, {4: 5.0})
    start_b, end_b = _logits({10: 5.0}, {11: 5.0})
    starts, ends = np.vstack([start_b, start_a, start_b]), np.vstack([end_b, end_a, end_b])
    offsets = np.stack([OFFSETS] * 3)
    predictions = decode_predictions(
        ["b", "a", "b"], starts, ends, offsets, {"a": CONTEXT, "b": CONTEXT, "c": CONTEXT}, QAConfig()
    )
    assert predictions["a"]["answer"] == "Warfarin"
    assert predictions["b"]["answer"] == "body."
    assert predictions["c"] == NO_ANSWER
