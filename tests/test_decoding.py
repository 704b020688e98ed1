import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qa_common import NO_ANSWER, QAConfig, decode_passages, decode_predictions, decode_spans, passage_relevance
from qa_common.decoding import NULL_SPAN, distinct_answers, rank_candidates

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


def test_top_k_answers_are_ranked_and_different_answers():
    # Ranked spans: "Warfarin slows blood clotting" 6, "Warfarin" 5.5 and "blood clotting" 5 (both inside
    # the first), "Warfarin slows blood clotting in the body" 5 (around it), then "the body" 4.
    start, end = _logits({4: 3.0, 6: 2.0, 9: 2.0}, {7: 3.0, 4: 2.5, 10: 2.0})
    ranked = rank_candidates(start, end, OFFSETS[None], QAConfig())
    texts = [CONTEXT[s:e] for s, e in ranked.spans]
    assert texts[0] == "Warfarin slows blood clotting"
    assert set(texts[1:4]) == {"Warfarin", "blood clotting", "Warfarin slows blood clotting in the body"}
    answers = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig(), top_k=2)
    assert [a["answer"] for a in answers] == ["Warfarin slows blood clotting", "the body"]
    # Each keeps its own share of the softmax: the top answer does not change with top_k.
    scores = ranked.scores()
    assert [a["score"] for a in answers] == pytest.approx([scores[0], scores[texts.index("the body")]])
    assert decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig())[0] == answers[0]


def test_the_same_answer_from_duplicate_passages_is_given_once():
    copy = CONTEXT.replace("blood clotting", "Blood clotting,")  # the same answer once normalised
    start, end = _logits({6: 5.0, 10: 1.0}, {7: 5.0, 10: 1.0})
    offsets = OFFSETS.copy()
    offsets[7] = (21, 30)  # "clotting," in the copy, one character longer from there on
    offsets[8:12] += 1
    answers = decode_passages(np.vstack([start, start]), np.vstack([end, end]), np.stack([OFFSETS, offsets]),
                              [0, 1], [CONTEXT, copy], QAConfig(), top_k=2)
    assert [a["answer"] for a in answers] == ["blood clotting", "body"]  # from either copy
    assert all([CONTEXT, copy][a["passage"]][a["start"]:a["end"]] == a["answer"] for a in answers)
    assert distinct_answers([(0, 5), (10, 15), (3, 12), (20, 25)], ["a b", "c", "d", "A, b."], 4) == [0, 1]
    assert distinct_answers([NULL_SPAN, (0, 5), (2, 3)], ["", "x", "y"], 5) == [0, 1]  # the null overlaps nothing


def test_no_valid_span_gives_the_empty_answer():
    start, end = _logits({}, {})
    no_context = np.full_like(OFFSETS, -1)
    assert decode_spans(start, end, no_context[None], CONTEXT, QAConfig()) == [NO_ANSWER]
    # One "no span" shape: the null answer's -1/-1, as the API documents.
    assert (NO_ANSWER["start"], NO_ANSWER["end"], NO_ANSWER["answer"]) == (-1, -1, "")


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


# --- the score: one probability over the question's whole candidate set --------------------------


def test_the_top_answer_has_the_highest_score_across_windows():
    # The reproduction: window 0 flat at 10 (many candidates), window 1 peaked at 9.5 on one token.
    flat_start, flat_end = np.full((1, len(OFFSETS)), 10.0), np.full((1, len(OFFSETS)), 10.0)
    peaked_start, peaked_end = _logits({7: 9.5}, {7: 9.5})
    windows = (np.vstack([flat_start, peaked_start]), np.vstack([flat_end, peaked_end]), np.stack([OFFSETS, OFFSETS]))
    scores = rank_candidates(*windows, QAConfig()).scores()
    assert sum(scores) == pytest.approx(1.0)
    answers = decode_spans(*windows, CONTEXT, QAConfig(), top_k=200)
    assert answers[0]["score"] == max(scores) == max(a["score"] for a in answers)
    # Every distinct span of the flat window ties at 20: each gets the same share.
    assert scores[0] == pytest.approx(scores[1])


def _windows(windows: int):
    """``windows`` windows over CONTEXT, each seeing a different slice of its tokens."""
    offsets = np.stack([OFFSETS] * windows)
    for w in range(1, windows):
        offsets[w, 4 : 4 + w] = -1  # later windows lose the first context tokens
    return offsets


@settings(max_examples=150, deadline=None)
@given(
    windows=st.integers(1, 3),
    data=st.data(),
    top_k=st.integers(1, 12),
    abstention=st.booleans(),
    threshold=st.floats(0.0, 1.0),
    max_answer_length=st.integers(1, 8),
)
def test_scores_are_probabilities_ranked_like_the_answers(windows, data, top_k, abstention, threshold,
                                                          max_answer_length):
    logits = arrays(np.float32, (windows, len(OFFSETS)), elements=st.floats(-20, 20, width=32))
    start, end = data.draw(logits), data.draw(logits)
    offsets = _windows(windows)
    config = QAConfig(max_answer_length=max_answer_length, version_2_with_negative=abstention,
                      no_answer_threshold=threshold)
    answers = decode_spans(start, end, offsets, CONTEXT, config, top_k=top_k)
    scores = [a["score"] for a in answers]
    assert 1 <= len(answers) <= top_k
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert sum(scores) <= 1.0 + 1e-9
    assert all(a >= b for a, b in zip(scores, scores[1:]))
    assert decode_spans(start, end, offsets, CONTEXT, config)[0] == answers[0]
    p_null = answers[0]["no_answer_probability"]
    assert 0.0 <= p_null <= 1.0 and all(a["no_answer_probability"] == p_null for a in answers)
    for answer in answers:
        if answer["answer"]:
            assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]
    abstained = answers[0]["start"] == -1
    assert abstained == (abstention and p_null > threshold)
    # The best span does not depend on abstention: it is the first non-null answer either way.
    best_span = decode_spans(start, end, offsets, CONTEXT, config.replace(version_2_with_negative=False), top_k=2)[0]
    spans = [(a["answer"], a["start"], a["end"]) for a in answers if a["start"] != -1]
    if spans:
        assert spans[0] == (best_span["answer"], best_span["start"], best_span["end"])


# --- the null answer ------------------------------------------------------------------------------

V2 = QAConfig(version_2_with_negative=True)


def test_no_answer_probability_is_the_sigmoid_of_null_minus_best_span():
    start, end = _logits({0: 3.0, 6: 2.0}, {0: 1.0, 7: 1.5})  # null 4.0, best span "blood clotting" 3.5
    [answer] = decode_spans(start, end, OFFSETS[None], CONTEXT, QAConfig())
    assert answer["answer"] == "blood clotting"  # SQuAD 1.1 decoding ignores the null score
    assert answer["no_answer_probability"] == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_abstains_when_the_null_score_beats_the_best_span_by_the_threshold():
    start, end = _logits({0: 3.0, 6: 2.0}, {0: 1.0, 7: 1.5})  # p_no_answer = sigmoid(0.5) = 0.62
    [abstained] = decode_spans(start, end, OFFSETS[None], CONTEXT, V2)
    assert (abstained["answer"], abstained["start"], abstained["end"]) == ("", -1, -1)
    assert abstained["no_answer_probability"] == pytest.approx(0.6225, abs=1e-4)
    spans = decode_spans(start, end, OFFSETS[None], CONTEXT, V2, top_k=50)[1:]
    assert abstained["score"] > max(a["score"] for a in spans)
    [answered] = decode_spans(start, end, OFFSETS[None], CONTEXT, V2.replace(no_answer_threshold=0.7))
    assert answered["answer"] == "blood clotting"
    [never] = decode_spans(start, end, OFFSETS[None], CONTEXT, V2.replace(no_answer_threshold=1.0))
    assert never["answer"] == "blood clotting"


def test_the_null_score_is_the_minimum_over_the_windows():
    # Window 0 is sure the answer is not in it (high [CLS]); window 1 holds it (low [CLS]).
    start_0, end_0 = _logits({0: 8.0, 4: 1.0}, {0: 8.0, 4: 1.0})
    start_1, end_1 = _logits({0: -2.0, 6: 3.0}, {0: -2.0, 7: 3.0})
    [answer] = decode_spans(np.vstack([start_0, start_1]), np.vstack([end_0, end_1]), np.stack([OFFSETS, OFFSETS]),
                            CONTEXT, V2)
    assert answer["answer"] == "blood clotting"
    assert answer["no_answer_probability"] == pytest.approx(1 / (1 + math.exp(6.0 + 4.0)))  # null -4 vs 6


def test_with_top_k_the_null_answer_takes_its_ranked_place():
    # Spans: "blood clotting" 6, "Warfarin slows blood clotting" 3.5, ...; null 4 ranks between them
    # (threshold 0.5: no shift).
    start, end = _logits({0: 2.0, 6: 3.0, 4: 0.5}, {0: 2.0, 7: 3.0, 4: 1.0})
    start[0, 1:4], end[0, 1:4] = 50.0, 50.0  # question tokens never count, not even for the null score
    answers = decode_spans(start, end, OFFSETS[None], CONTEXT, V2, top_k=4)
    assert [a["answer"] for a in answers[:2]] == ["blood clotting", ""]
    assert answers[1]["start"] == answers[1]["end"] == -1
    assert answers[0]["score"] > answers[1]["score"] >= answers[2]["score"]
    assert answers[0]["score"] / answers[1]["score"] == pytest.approx(math.exp(2.0), rel=1e-5)
    # Abstaining (a low threshold), it moves first; the spans keep their order behind it.
    low = decode_spans(start, end, OFFSETS[None], CONTEXT, V2.replace(no_answer_threshold=0.05), top_k=4)
    assert low[0]["start"] == -1
    assert [a["answer"] for a in low[1:]] == [answers[0]["answer"], *(a["answer"] for a in answers[2:])]


def test_no_context_at_all_is_no_answer_with_or_without_abstention():
    start, end = _logits({}, {})
    no_context = np.full_like(OFFSETS, -1)[None]
    [answer] = decode_spans(start, end, no_context, CONTEXT, V2)
    assert (answer["answer"], answer["start"], answer["end"], answer["score"]) == ("", -1, -1, 1.0)
    assert decode_spans(start, end, no_context, CONTEXT, QAConfig()) == [NO_ANSWER]


def test_passages_are_read_as_one_candidate_set_with_offsets_into_their_own_passage():
    other = "Heparin is given as a bolus."
    other_offsets = np.array([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [0, 7], [8, 10], [11, 16], [17, 19],
                              [20, 21], [22, 27], [27, 28], [-1, -1], [-1, -1]])
    weak_start, weak_end = _logits({4: 2.0}, {4: 2.0})  # "Heparin": 4.0
    strong_start, strong_end = _logits({6: 5.0}, {7: 5.0})  # "blood clotting": 10.0
    start, end = np.vstack([weak_start, strong_start]), np.vstack([weak_end, strong_end])
    offsets = np.stack([other_offsets, OFFSETS])
    answers = decode_passages(start, end, offsets, [0, 1], [other, CONTEXT], QAConfig(), top_k=50)
    assert (answers[0]["answer"], answers[0]["passage"], answers[0]["start"]) == ("blood clotting", 1, 15)
    heparin = next(a for a in answers if a["answer"] == "Heparin")
    assert heparin["passage"] == 0 and (heparin["start"], heparin["end"]) == (0, 7)
    passages = [other, CONTEXT]
    for answer in answers:
        assert passages[answer["passage"]][answer["start"] : answer["end"]] == answer["answer"]
    # One softmax over both passages: the scores' ratio is exp of the logit sums' difference (10 - 4).
    assert answers[0]["score"] / heparin["score"] == pytest.approx(math.exp(6.0), rel=1e-4)
    # One passage: decode_spans' answer, with passage 0 (its list differs where two spans read as one
    # answer: "the body" and "body." are merged over passages, below).
    [alone] = decode_passages(strong_start, strong_end, OFFSETS[None], [0], [CONTEXT], QAConfig())
    assert alone == {**decode_spans(strong_start, strong_end, OFFSETS[None], CONTEXT, QAConfig())[0], "passage": 0}


def test_an_answer_found_in_several_passages_has_the_share_of_all_its_spans():
    other = "Heparin is given as a bolus."
    other_offsets = np.array([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [0, 7], [8, 10], [11, 16], [17, 19],
                              [20, 21], [22, 27], [27, 28], [-1, -1], [-1, -1]])
    heparin = _logits({4: 3.25}, {4: 3.25})  # "Heparin": 6.5
    clotting = _logits({6: 3.0}, {7: 3.0})  # "blood clotting": 6.0 in each passage that holds it
    copy = "Warfarin slows Blood clotting in the body."  # the same answer once normalised

    def read(passages, windows, top_k=1):
        offsets = np.stack([other_offsets if passage == other else OFFSETS for passage in passages])
        start, end = (np.vstack([w[i] for w in windows]) for i in (0, 1))
        return decode_passages(start, end, offsets, list(range(len(passages))), passages, QAConfig(), top_k=top_k)

    assert read([other, CONTEXT], [heparin, clotting])[0]["answer"] == "Heparin"  # once: 6.0 < 6.5
    answers = read([other, CONTEXT, copy], [heparin, clotting, clotting], top_k=2)
    assert [(a["answer"], a["passage"]) for a in answers] == [("blood clotting", 1), ("Heparin", 0)]
    # Its score is both spans' shares of the one softmax: 2 e^6 against e^6.5.
    assert answers[0]["score"] / answers[1]["score"] == pytest.approx(2 * math.exp(-0.5), rel=1e-4)
    # Abstaining stays first, with a score no lower than the merged answer's.
    config = QAConfig(version_2_with_negative=True, no_answer_threshold=0.0)
    offsets = np.stack([other_offsets, OFFSETS, OFFSETS])
    start, end = (np.vstack([w[i] for w in (heparin, clotting, clotting)]) for i in (0, 1))
    abstained = decode_passages(start, end, offsets, [0, 1, 2], [other, CONTEXT, copy], config, top_k=2)
    assert [a["answer"] for a in abstained] == ["", "blood clotting"]
    assert abstained[0]["score"] >= abstained[1]["score"]


def test_a_passage_the_search_ranks_lower_must_convince_the_reader_more():
    """passage_rank_weight w lowers each span of the passage at search rank r by w ln r; [CLS] stays."""
    other = "Heparin is given as a bolus."
    other_offsets = np.array([[-1, -1], [-1, -1], [-1, -1], [-1, -1], [0, 7], [8, 10], [11, 16], [17, 19],
                              [20, 21], [22, 27], [27, 28], [-1, -1], [-1, -1]])
    first = _logits({0: 1.0, 4: 2.0}, {0: 1.0, 4: 2.0})  # the search's first passage: "Heparin" 4.0
    second = _logits({0: 1.0, 6: 5.0}, {0: 1.0, 7: 5.0})  # its second: "blood clotting" 10.0
    start, end = np.vstack([first[0], second[0]]), np.vstack([first[1], second[1]])
    offsets, passages = np.stack([other_offsets, OFFSETS]), [other, CONTEXT]

    def read(weight, **settings):
        config = QAConfig(**settings, passages_calibration={"passage_rank_weight": weight})
        return decode_passages(start, end, offsets, [0, 1], passages, config, top_k=2)

    assert read(0.0)[0]["answer"] == "blood clotting"
    near = read(8.0)  # 10 - 8 ln 2 = 4.45 > 4: still the second passage's answer, by exp(0.45)
    assert near[0]["answer"] == "blood clotting"
    assert near[0]["score"] / near[1]["score"] == pytest.approx(math.exp(6.0 - 8.0 * math.log(2)), rel=1e-4)
    assert read(9.0)[0]["answer"] == "Heparin"  # 10 - 9 ln 2 = 3.76 < 4
    # The prior moves spans, not [CLS]: the null answer's odds are those of the best span left.
    abstaining = {"version_2_with_negative": True, "no_answer_threshold": 1.0}
    null_score = 1.0 + 1.0
    for weight, best in ((0.0, 10.0), (9.0, 4.0)):
        [answer] = read(weight, **abstaining)[:1]
        assert answer["no_answer_probability"] == pytest.approx(1 / (1 + math.exp(best - null_score)))
    # Only over passages: the same weight at the top level reads a lone paragraph as before.
    weighted = QAConfig(passage_rank_weight=9.0)
    assert decode_spans(*second, OFFSETS[None], CONTEXT, weighted) == decode_spans(*second, OFFSETS[None], CONTEXT,
                                                                                   QAConfig())


def test_the_null_answer_over_passages_is_the_least_null_window_and_names_no_passage():
    config = QAConfig(version_2_with_negative=True)
    drawn_to_null = _logits({0: 9.0, 6: 1.0}, {0: 9.0, 7: 1.0})
    both = [np.vstack([drawn_to_null[0], drawn_to_null[0]]), np.vstack([drawn_to_null[1], drawn_to_null[1]])]
    [best] = decode_passages(*both, np.stack([OFFSETS, OFFSETS]), [0, 1], [CONTEXT, CONTEXT], config)
    assert (best["answer"], best["start"], best["end"], best["passage"]) == ("", -1, -1, -1)
    answering = _logits({0: 1.0, 6: 8.0}, {0: 1.0, 7: 8.0})  # one passage holds the answer: no abstention
    mixed = [np.vstack([drawn_to_null[0], answering[0]]), np.vstack([drawn_to_null[1], answering[1]])]
    [best] = decode_passages(*mixed, np.stack([OFFSETS, OFFSETS]), [0, 1], [CONTEXT, CONTEXT], config)
    assert (best["answer"], best["passage"]) == ("blood clotting", 1)


def test_passages_are_ranked_by_what_the_reader_finds_in_each_against_its_null():
    # Passage 0: two windows, the better one's best start 3 + best end 2 against a null of 1; passage 1:
    # a stronger span but a stronger null (8 - 7); passage 2: no window; passage 3: the strongest span,
    # on question tokens only, where no answer can be.
    windows = [_logits({0: 0.5, 6: 1.0}, {0: 0.5, 7: 1.0}), _logits({0: 0.5, 5: 3.0}, {0: 0.5, 9: 2.0}),
               _logits({0: 4.0, 6: 4.0}, {0: 3.0, 7: 4.0}), _logits({1: 20.0, 6: 1.0}, {2: 20.0, 7: 1.0})]
    start, end = np.vstack([w[0] for w in windows]), np.vstack([w[1] for w in windows])
    relevance = passage_relevance(start, end, np.stack([OFFSETS] * 4), [0, 0, 1, 3], 4)
    assert relevance[0] == pytest.approx(3.0 + 2.0 - 1.0) and relevance[1] == pytest.approx(8.0 - 7.0)
    assert relevance[2] == -np.inf and relevance[3] == pytest.approx(2.0)
    assert list(np.argsort(-relevance, kind="stable")) == [0, 3, 1, 2]
