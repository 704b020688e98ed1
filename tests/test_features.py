import json

import numpy as np
import pytest

from qa_common import QAConfig, count_windows, prepare_eval_features, prepare_train_features, trim_padding


def _train_features(records, tokenizer, config):
    return prepare_train_features(
        [r["question"] for r in records], [r["context"] for r in records],
        [r["answers"]["answer_start"][0] for r in records], [r["answers"]["text"][0] for r in records],
        tokenizer, config,
    )


def _eval_features(records, tokenizer, config):
    return prepare_eval_features(
        [r["id"] for r in records], [r["question"] for r in records], [r["context"] for r in records],
        tokenizer, config,
    )


def test_labels_round_trip_to_the_gold_text(fixture_records, tiny_model_and_tokenizer, small_config):
    _, tokenizer = tiny_model_and_tokenizer
    train = _train_features(fixture_records, tokenizer, small_config)
    evaluation = _eval_features(fixture_records, tokenizer, small_config)
    by_id = {r["id"]: r for r in fixture_records}
    windows_per_example = np.unique(evaluation["example_id"], return_counts=True)[1]
    assert windows_per_example.max() >= 3, "the fixture must exercise several overlapping windows"
    assert len(train["input_ids"]) == len(evaluation["input_ids"])

    labelled = 0
    for i, example_id in enumerate(evaluation["example_id"]):
        record = by_id[example_id]
        gold, gold_start = record["answers"]["text"][0], record["answers"]["answer_start"][0]
        offsets = evaluation["offset_mapping"][i]
        context_chars = offsets[offsets[:, 0] >= 0]
        window_holds_answer = context_chars[0, 0] <= gold_start and context_chars[-1, 1] >= gold_start + len(gold)
        start, end = train["start_positions"][i], train["end_positions"][i]
        if window_holds_answer:
            labelled += 1
            assert record["context"][offsets[start, 0] : offsets[end, 1]] == gold
        else:
            assert (start, end) == (0, 0)
    assert 0 < labelled < len(evaluation["input_ids"])


def test_eval_offsets_mask_everything_but_the_context(fixture_records, tiny_model_and_tokenizer, small_config):
    _, tokenizer = tiny_model_and_tokenizer
    record = fixture_records[0]
    features = _eval_features([record], tokenizer, small_config)
    offsets, token_types, mask = features["offset_mapping"], features["token_type_ids"], features["attention_mask"]
    is_context = offsets[..., 0] >= 0
    assert not is_context[:, 0].any()  # [CLS]
    assert not (is_context & (token_types == 0)).any()  # question tokens
    assert not (is_context & (mask == 0)).any()  # padding
    for row_offsets, row_context in zip(offsets, is_context):
        spans = row_offsets[row_context]
        assert (spans[:, 1] > spans[:, 0]).all() and (np.diff(spans[:, 0]) > 0).all()
        for start, end in spans:
            assert record["context"][start:end].strip() == record["context"][start:end]


def test_windows_overlap_by_the_stride(fixture_records, tiny_model_and_tokenizer, small_config):
    _, tokenizer = tiny_model_and_tokenizer
    offsets = _eval_features([fixture_records[-5]], tokenizer, small_config)["offset_mapping"]
    assert len(offsets) >= 2
    first = {tuple(o) for o in offsets[0] if o[0] >= 0}
    second = {tuple(o) for o in offsets[1] if o[0] >= 0}
    assert len(first & second) == small_config.stride


def test_a_question_longer_than_the_window_is_cut_not_fatal(fixture_records, tiny_model_and_tokenizer, small_config):
    _, tokenizer = tiny_model_and_tokenizer
    record = fixture_records[0]
    long_question = " ".join(["what is the most effective way"] * 30) + "?"
    features = _eval_features([{**record, "question": long_question}], tokenizer, small_config)
    question_tokens = ((features["token_type_ids"][0] == 0) & (features["attention_mask"][0] == 1)).sum()
    assert question_tokens == small_config.max_question_length + 2  # plus [CLS] and [SEP]
    assert (features["offset_mapping"][:, :, 0] >= 0).any(axis=1).all()


def test_trim_padding_cuts_to_the_longest_row():
    batch = {
        "input_ids": np.array([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
        "offset_mapping": np.zeros((2, 5, 2)),
        "start_positions": np.array([1, 2]),
    }
    trimmed = trim_padding(batch)
    assert trimmed["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0]]
    assert trimmed["offset_mapping"].shape == (2, 3, 2)
    assert trimmed["start_positions"].tolist() == [1, 2]
    assert trim_padding(batch, multiple_of=2)["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 0, 0]]
    assert trim_padding(batch, multiple_of=8)["offset_mapping"].shape == (2, 5, 2)  # never past the width


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": 384}, "stride"),
        ({"max_length": 0}, "positive integer"),
        ({"max_length": 128, "stride": 64, "max_question_length": 64}, "context tokens per window"),
        ({"n_best": "20"}, "positive integer"),
    ],
)
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QAConfig(**kwargs)


def test_length_grouped_batches_keep_every_row_and_group_similar_lengths():
    from qa_common import length_grouped_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=64)
    big = {"attention_mask": (np.arange(40)[None, :] < lengths[:, None]).astype(np.int32), "row": np.arange(64)}
    batches = list(length_grouped_batches([big, big], 8, np.random.default_rng(1)))
    assert len(batches) == 16
    rows = np.concatenate([b["row"] for b in batches])
    assert sorted(rows.tolist()) == sorted(list(range(64)) * 2)
    padded_width = sum(trim_padding(b)["attention_mask"].size for b in batches)
    naive_width = sum(trim_padding({k: v[i:i + 8] for k, v in big.items()})["attention_mask"].size
                      for _ in range(2) for i in range(0, 64, 8))
    assert padded_width < 0.8 * naive_width
    sorted_slices = [np.sort(lengths)[i:i + 8].tolist() for i in range(0, 64, 8)]
    for batch in batches:  # each batch is one run of neighbours in length order
        assert sorted(batch["attention_mask"].sum(axis=1).tolist()) in sorted_slices


def test_an_override_of_a_fitted_setting_also_replaces_the_librarys(tmp_path):
    from qa_common import load_qa_config, save_qa_config

    fitted = {"no_answer_threshold": 0.3, "passage_rank_weight": 1.0, "no_answer_bias": -2.0}
    save_qa_config(QAConfig(no_answer_threshold=0.6, passages_calibration=fitted), tmp_path)
    served = load_qa_config(tmp_path, no_answer_threshold=0.8, passage_rank_weight=None, max_length=256)
    assert served.no_answer_threshold == 0.8
    assert served.passages_calibration == {**fitted, "no_answer_threshold": 0.8}
    library = served.over_passages()
    assert (library.no_answer_threshold, library.passage_rank_weight, library.no_answer_bias) == (0.8, 1.0, -2.0)
    assert load_qa_config(tmp_path, passages_calibration={}).over_passages().no_answer_threshold == 0.6


def test_qa_config_round_trips_through_a_model_directory(tmp_path):
    from qa_common import load_qa_config, save_qa_config

    assert load_qa_config(tmp_path) == QAConfig()
    save_qa_config(QAConfig(max_length=256, stride=96), tmp_path)
    assert load_qa_config(tmp_path) == QAConfig(max_length=256, stride=96)
    overridden = load_qa_config(tmp_path, max_answer_length=5, stride=None)
    assert (overridden.max_answer_length, overridden.stride, overridden.max_length) == (5, 96, 256)
    with pytest.raises(ValueError, match="unknown QA setting.*max_answer_lenght"):
        load_qa_config(tmp_path, max_answer_lenght=5)
    saved = json.loads((tmp_path / "qa_config.json").read_text())
    (tmp_path / "qa_config.json").write_text(json.dumps({**saved, "no_answer_treshold": 0.3}))
    with pytest.raises(ValueError, match=r"qa_config.json: unknown QA setting\(s\) no_answer_treshold"):
        load_qa_config(tmp_path)


@pytest.mark.parametrize("config", [
    QAConfig(max_length=48, stride=16, max_question_length=20),
    QAConfig(max_length=32, stride=4, max_question_length=8),
    QAConfig(),
])
def test_count_windows_equals_the_windows_actually_made(fixture_records, tiny_model_and_tokenizer, config):
    _, tokenizer = tiny_model_and_tokenizer
    questions = [r["question"] for r in fixture_records] + ["why " * 40, "why"]
    # Short, exactly-one-window and many-window contexts, including a long question that gets cut.
    contexts = [r["context"] * (1 + i % 3) for i, r in enumerate(fixture_records)] + ["x", fixture_records[0]["context"] * 9]
    features = prepare_eval_features([str(i) for i in range(len(questions))], questions, contexts, tokenizer, config)
    made = np.bincount(features["example_id"].astype(int), minlength=len(questions))
    counted = count_windows(tokenizer, questions, contexts, config)
    assert counted == made.tolist()
    assert max(counted) > 1 and min(counted) == 1
def byte_level_bpe_tokenizer(pair_template: str = "<s> $A </s> $B:1 </s>:1"):
    """A byte-level BPE tokenizer (GPT-2/RoBERTa style) trained on the fixture text: characters it
    never saw, such as emoji, become one token per byte."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from conftest import FIXTURES

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([(FIXTURES / "tiny-squad.jsonl").read_text(encoding="utf-8")], vocab_size=400,
                            special_tokens=["<s>", "</s>", "<pad>"])
    bpe = bpe._tokenizer  # the tokenizers.Tokenizer inside the trainer's wrapper
    bpe.post_processor = TemplateProcessing(
        single="<s> $A </s>", pair=pair_template,
        special_tokens=[("<s>", bpe.token_to_id("<s>")), ("</s>", bpe.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_short_questions_are_bounded_by_tokens_not_characters():
    from qa_common.features import truncate_questions

    tokenizer = byte_level_bpe_tokenizer()
    question = "🩺" * 8  # 8 characters, 32 bytes: 32 byte tokens
    assert len(tokenizer(question, add_special_tokens=False)["input_ids"]) > 20
    [cut] = truncate_questions([question], tokenizer, max_question_length=20)
    assert 0 < len(cut) < len(question) and question.startswith(cut)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 20
    config = QAConfig(max_length=64, stride=16, max_question_length=20)
    features = prepare_eval_features(["q"], [question], ["The patient was seen in clinic today."], tokenizer, config)
    assert features["input_ids"].shape[1] == 64


def test_the_special_tokens_and_padding_side_come_from_the_tokenizer():
    from qa_common.features import UnsupportedTokenizerError, check_tokenizer

    config = QAConfig(max_length=48, stride=24, max_question_length=20)  # room for 25 - 1 context tokens with 4 specials
    check_tokenizer(byte_level_bpe_tokenizer(), config)  # 3 special tokens, as QAConfig assumes
    four = byte_level_bpe_tokenizer(pair_template="<s> $A </s> </s> $B:1 </s>:1")  # RoBERTa's pair layout
    assert four.num_special_tokens_to_add(pair=True) == 4
    with pytest.raises(UnsupportedTokenizerError, match="adds 4 special tokens .* leaving 24 context tokens"):
        check_tokenizer(four, config)
    left = byte_level_bpe_tokenizer()
    left.padding_side = "left"
    with pytest.raises(UnsupportedTokenizerError, match=r"tokenizer \w+ \(unnamed\) pads on the left"):
        prepare_eval_features(["q"], ["Why?"], ["Because."], left, config)


def test_count_windows_uses_the_tokenizers_own_special_token_count(fixture_records):
    four = byte_level_bpe_tokenizer(pair_template="<s> $A </s> </s> $B:1 </s>:1")  # RoBERTa's pair layout
    config = QAConfig(max_length=48, stride=8, max_question_length=16)
    questions = [r["question"] for r in fixture_records] * 3
    contexts = [" ".join(r["context"].split()[: 4 + 3 * i]) for i, r in enumerate(fixture_records * 3)]
    features = prepare_eval_features([str(i) for i in range(len(questions))], questions, contexts, four, config)
    made = np.bincount(features["example_id"].astype(int), minlength=len(questions))
    assert count_windows(four, questions, contexts, config) == made.tolist()
    assert max(made) > 2
