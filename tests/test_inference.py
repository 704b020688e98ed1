import numpy as np
import pytest

from qa_common import (
    QAConfig, Question, answer_questions, decode_spans, load_model_and_tokenizer, predict_logits,
    prepare_eval_features, resolve_model_path,
)
from qa_common.metric import normalize_answer


def test_answers_point_into_their_own_context(tiny_model_and_tokenizer, fixture_records, small_config):
    model, tokenizer = tiny_model_and_tokenizer
    questions = [Question(r["question"], r["context"], top_k=3) for r in fixture_records]
    results = answer_questions(model, tokenizer, questions, small_config, batch_size=4)
    assert len(results) == len(questions)
    for question, answers in zip(questions, results):
        assert 1 <= len(answers) <= 3
        for answer in answers:
            assert set(answer) == {"answer", "score", "start", "end", "no_answer_probability"}
            assert question.context[answer["start"] : answer["end"]] == answer["answer"]
            assert 0.0 <= answer["score"] <= 1.0


def test_batched_answers_equal_one_at_a_time_decoding(tiny_model_and_tokenizer, fixture_records, small_config):
    model, tokenizer = tiny_model_and_tokenizer
    records = fixture_records[:5]
    together = answer_questions(
        model, tokenizer, [Question(r["question"], r["context"]) for r in records], small_config
    )
    for record, answers in zip(records, together):
        features = prepare_eval_features([record["id"]], [record["question"]], [record["context"]], tokenizer, small_config)
        start, end = predict_logits(model, features)
        alone = decode_spans(start, end, features["offset_mapping"], record["context"], small_config)
        assert answers[0]["answer"] == alone[0]["answer"]
        assert answers[0]["score"] == pytest.approx(alone[0]["score"], rel=1e-4)


def test_forward_batches_bound_padding_and_size_and_keep_every_window_once():
    from qa_common.inference import forward_batches

    lengths = np.array([256, 108, 149, 118, 211, 136, 142, 214, 156])  # a dev question's eight passages' windows
    batches = forward_batches(lengths, 64, max_padding=0.1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[np.concatenate(batches)]) >= 0)  # shortest first
    for rows in batches:
        assert len(rows) * lengths[rows].max() <= 1.1 * lengths[rows].sum()
    assert 1 < len(batches) < len(lengths)  # neither one batch padded to 256 nor one window a batch
    assert len(forward_batches(lengths, 64, max_padding=10.0)) == 1
    uniform = np.full(200, 120)  # thousands of windows sorted by length fill whole batches
    assert [len(rows) for rows in forward_batches(uniform, 64)] == [64, 64, 64, 8]
    # a token budget: 4,096 tokens are 16 windows of 256, 34 of 120, all 64 of 60; a longer window runs alone
    assert [len(rows) for rows in forward_batches(np.full(40, 256), 64, max_tokens=4096)] == [16, 16, 8]
    assert [len(rows) for rows in forward_batches(uniform, 64, max_tokens=4096)] == [34] * 5 + [30]
    assert [len(rows) for rows in forward_batches(np.full(64, 60), 64, max_tokens=4096)] == [64]
    assert [len(rows) for rows in forward_batches(np.array([5000, 5000]), 64, max_tokens=4096)] == [1, 1]


def test_a_runner_off_the_cpu_gets_whole_batches(tiny_model_and_tokenizer):
    from qa_common.inference import TorchRunner

    model, _ = tiny_model_and_tokenizer
    assert TorchRunner(model).on_cpu
    lengths = [256, 108, 149, 118, 211]
    features = {"input_ids": np.ones((5, 256), dtype=np.int64),
                "attention_mask": (np.arange(256) < np.array(lengths)[:, None]).astype(np.int64)}

    class Recording:
        input_names = ("input_ids", "attention_mask")

        length_multiple = 1

        def __init__(self, on_cpu):
            self.on_cpu, self.batches = on_cpu, []

        def __call__(self, batch):
            self.batches.append(batch["input_ids"].shape)
            return np.zeros(batch["input_ids"].shape, np.float32), np.zeros(batch["input_ids"].shape, np.float32)

    cpu, gpu = Recording(True), Recording(False)
    predict_logits(cpu, features)
    predict_logits(gpu, features)
    assert len(cpu.batches) > 1 and gpu.batches == [(5, 256)]

    # 40 windows of 256 tokens: 16 at a time on a CPU (CPU_BATCH_TOKENS), one batch of 40 elsewhere
    long = {"input_ids": np.ones((40, 256), dtype=np.int64), "attention_mask": np.ones((40, 256), dtype=np.int64)}
    cpu, gpu = Recording(True), Recording(False)
    predict_logits(cpu, long)
    predict_logits(gpu, long)
    assert cpu.batches == [(16, 256), (16, 256), (8, 256)] and gpu.batches == [(40, 256)]


def test_pytorch_on_a_cpu_computes_batches_cut_to_a_few_widths_with_the_same_logits(tiny_model_and_tokenizer):
    from qa_common.features import LENGTH_MULTIPLE
    from qa_common.inference import TorchRunner

    model, _ = tiny_model_and_tokenizer
    widths = []

    class Recording(TorchRunner):
        def __call__(self, batch):
            widths.append(batch["input_ids"].shape[1])
            return super().__call__(batch)

    lengths = np.array([40, 75, 100, 130, 131])
    rng = np.random.default_rng(0)
    features = {"input_ids": rng.integers(5, 50, (5, 256)),
                "attention_mask": (np.arange(256) < lengths[:, None]).astype(np.int64)}
    features["input_ids"] *= features["attention_mask"]
    start, end = predict_logits(Recording(model), features, batch_size=2)
    assert Recording(model).length_multiple == LENGTH_MULTIPLE == 32
    assert widths and all(width % LENGTH_MULTIPLE == 0 for width in widths) and sorted(widths) == widths
    for row, length in enumerate(lengths):  # each window alone, cut to its own length
        alone_start, alone_end = TorchRunner(model)({name: value[row:row + 1, :length] for name, value in features.items()})
        np.testing.assert_allclose(start[row, :length], alone_start[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(end[row, :length], alone_end[0], rtol=1e-4, atol=1e-5)


def test_answers_do_not_depend_on_how_windows_are_batched(tiny_model_and_tokenizer, fixture_records, small_config):
    from qa_common.inference import PassagesQuestion

    model, tokenizer = tiny_model_and_tokenizer
    question = PassagesQuestion(fixture_records[0]["question"], tuple(r["context"] for r in fixture_records[:6]), top_k=3)
    bounded = answer_questions(model, tokenizer, [question], small_config)
    one_by_one = answer_questions(model, tokenizer, [question], small_config, batch_size=1)
    assert [a["answer"] for a in bounded[0]] == [a["answer"] for a in one_by_one[0]]
    for ours, theirs in zip(bounded[0], one_by_one[0]):
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-4)


def test_max_answer_length_per_question_is_respected(tiny_model_and_tokenizer, fixture_records):
    model, tokenizer = tiny_model_and_tokenizer
    record = fixture_records[5]
    [answers] = answer_questions(
        model, tokenizer, [Question(record["question"], record["context"], top_k=5, max_answer_length=1)], QAConfig()
    )
    for answer in answers:
        assert len(tokenizer(answer["answer"], add_special_tokens=False)["input_ids"]) == 1


def test_local_model_directory_loads_and_missing_paths_say_so(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2 and tokenizer.is_fast
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "no-model"))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model_path(str(tmp_path))


def test_logits_of_padding_are_never_decoded(tiny_model_and_tokenizer, small_config):
    model, tokenizer = tiny_model_and_tokenizer
    features = prepare_eval_features(["a"], ["short?"], ["Tiny context."], tokenizer, small_config)
    start, _ = predict_logits(model, features)
    assert np.isneginf(start[0, features["attention_mask"][0].sum():]).all()


def test_a_question_over_several_passages_answers_from_one_of_them(tiny_model_and_tokenizer, fixture_records,
                                                                   small_config):
    from qa_common import PassagesQuestion

    model, tokenizer = tiny_model_and_tokenizer
    contexts = tuple(dict.fromkeys(r["context"] for r in fixture_records))
    record = fixture_records[0]
    [answers] = answer_questions(model, tokenizer, [PassagesQuestion(record["question"], contexts, top_k=5)],
                                 small_config)
    assert answers and {a["passage"] for a in answers} <= set(range(len(contexts)))
    for answer in answers:
        assert contexts[answer["passage"]][answer["start"]:answer["end"]] == answer["answer"]
    # Different answers: the spans that read as one answer over all passages are one answer
    # (qa_common.decoding.merge_same_answers; what it ranks first: tests/test_decoding.py).
    assert len({normalize_answer(a["answer"]) for a in answers}) == len(answers)
