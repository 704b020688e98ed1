"""Multi-passage training data from a library's own retrievals (python -m library_job mine), and the
sentence embedder fine-tuned on it (python -m train_job.embedder)."""

import argparse
import json
import stat

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from qa_common import read_squad
from qa_common.calibration.passages import passage_groups
from qa_common.library.embedding import Embedder
from library_job.__main__ import main as library_job
from library_job.mine import answers_in, group_records, split_articles
from train_job.embedder import main as train_embedder
from train_job.embedder import cached_pair_loss_backward, pair_loss, training_pairs


def test_an_answer_counts_only_as_whole_words():
    assert answers_in("In 1990 it rained; in 19 it did not.", ["19"]) == [("19", 22)]
    assert answers_in("It began in 1990.", ["19"]) == []
    assert answers_in("The INR (target 2-3) rose.", ["nope", "2-3"]) == [("2-3", 16)]


def test_a_group_is_one_record_per_passage_answered_where_the_passage_holds_the_answer():
    question = {"id": "q1", "title": "T", "question": "Who?", "answers": {"text": ["Ann Lee"], "answer_start": [0]}}
    records = group_records(question, ["Nobody here.", "It was Ann Lee, said Ann Lee."])
    assert [r["id"] for r in records] == ["q1/0", "q1/1"] and {r["group"] for r in records} == {"q1"}
    assert records[0]["answers"] == {"text": [], "answer_start": []}
    assert records[1]["answers"] == {"text": ["Ann Lee"], "answer_start": [7]}


def test_a_record_keeps_every_answer_its_passage_holds_the_first_one_first():
    """SQuAD's dev questions have up to three answers; a span equal to any of them is right, in
    the calibration over passages as in the metric, and training learns the first one found."""
    question = {"id": "q", "title": "T", "question": "Who won?",
                "answers": {"text": ["Denver Broncos", "the Denver Broncos", "Broncos", "Denver Broncos"],
                            "answer_start": [0, 0, 0, 0]}}
    [only_last, every] = group_records(question, ["The Broncos won.", "In the end the Denver Broncos won."])
    assert only_last["answers"] == {"text": ["Broncos"], "answer_start": [4]}
    assert every["answers"] == {"text": ["Denver Broncos", "the Denver Broncos", "Broncos"],
                                "answer_start": [15, 11, 22]}
    [(_, _, golds, _)] = passage_groups([only_last, every])
    assert golds == ["Broncos", "Denver Broncos", "the Denver Broncos"]


def mine_args(*flags: str):
    from library_job.mine import add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(["--data", "unused", "--output", "unused", *flags])


def test_a_whole_library_holds_the_articles_not_asked_about_and_leaves_the_absent_ones_out():
    records = [{"id": f"{title}{n}", "title": title, "context": f"{title} paragraph {n % 2}", "question": "?",
                "answers": {"text": [], "answer_start": []}} for title in "ABCDEFGHIJ" for n in range(4)]
    asked, validation, library, absent = split_articles(records, mine_args("--articles", "5", "--absent-articles", "0.2"))
    asked_titles, library_titles = {r["title"] for r in asked}, {r["title"] for r in library}
    assert len(asked_titles) == 5 and validation == [] and len(absent) == 1 and absent < asked_titles
    assert library_titles == asked_titles - absent  # by default: only the articles asked about

    whole = split_articles(records, mine_args("--articles", "5", "--absent-articles", "0.2", "--whole-library"))
    assert whole[0] == asked and whole[3] == absent  # the same questions, the same absent articles
    assert {r["title"] for r in whole[2]} == set("ABCDEFGHIJ") - absent  # and every other article in the library
    with pytest.raises(ValueError, match="--whole-library"):
        split_articles(records, mine_args("--whole-library", "--validation-questions", "4"))


def test_calibration_questions_read_as_many_passages_as_the_service_and_training_ones_as_trained():
    from library_job.mine import TRAINING_PASSAGES, passages_per_question
    from qa_common.library.search import PASSAGES_READ

    assert TRAINING_PASSAGES != PASSAGES_READ  # else this test could not tell the two defaults apart
    assert passages_per_question(mine_args()) == TRAINING_PASSAGES
    assert passages_per_question(mine_args("--whole-library")) == PASSAGES_READ
    assert passages_per_question(mine_args("--whole-library", "--passages", "3")) == 3
    assert passages_per_question(mine_args("--passages", "3")) == 3


def test_every_question_is_read_over_the_passages_the_library_returns(local_ray, tiny_model_dir, tmp_path):
    data = FIXTURES / "tiny-squad.json"
    out = tmp_path / "mined"
    assert library_job(["mine", "--data", str(data), "--output", str(out), "--passages", "2", "--absent-articles", "0",
                        "--concurrency", "1"]) == 0
    questions = {r["id"]: r for r in read_squad(data)}
    mined = read_squad(out / "train.json")
    assert stat.S_IMODE((out / "train.json").stat().st_mode) == 0o600
    groups = {}
    for record in mined:
        groups.setdefault(record["group"], []).append(record)
    assert set(groups) == set(questions) and all(len(group) == 2 for group in groups.values())
    paragraphs = {r["context"] for r in questions.values()}
    for group_id, group in groups.items():
        question = questions[group_id]
        assert all(r["question"] == question["question"] and r["context"] in paragraphs for r in group)
        assert [r["id"] for r in group] == [f"{group_id}/0", f"{group_id}/1"]  # the search's order, which decoding weighs
        for record in group:  # answered exactly where the read passage holds one of its answers
            assert [(t, s) for t, s in zip(record["answers"]["text"], record["answers"]["answer_start"])] == \
                answers_in(record["context"], question["answers"]["text"])
    summary = json.loads((out / "mined.json").read_text())
    assert summary["questions"] == len(questions) and summary["records"] == len(mined)
    assert summary["answered"] + summary["unanswered"] == len(questions)

    # The reader trains on the groups, one softmax per question over all its passages' windows.
    from conftest import V2_DATA, abstaining_qa
    from train_job.config import TrainConfig
    from train_job.run import run

    reader = run(TrainConfig(
        model=str(tiny_model_dir), train_file=str(out / "train.json"), validation_file=str(V2_DATA),
        output_dir=str(tmp_path / "reader"), epochs=1, per_device_batch_size=4, shared_normalization=True,
        learning_rate=1e-3, max_failures=0, qa=abstaining_qa()).validate())
    assert reader["train_examples"] == len(mined) and reader["train_features"] >= len(mined)
    assert (tmp_path / "reader" / "model" / "qa_config.json").is_file()

    # What shared normalisation costs per window, measured on the same batches (bench smoke run).
    from bench import shared_normalization

    assert shared_normalization.main(["--model", str(tiny_model_dir), "--data", str(out / "train.json"), "--block", "1",
                                      "--blocks", "1", "--batch-size", "2", "--out", str(tmp_path / "bench.json")]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["results"]["shared"]["windows"] > 0 and bench["ratios"]["shared_vs_per_window_windows_per_s"] > 0

    # The embedder learns from the groups: a model directory the library's Embedder loads.
    model = build_embedder_dir(tmp_path / "embedder")
    assert train_embedder(["--train-file", str(out / "train.json"), "--output-dir", str(tmp_path / "trained"),
                           "--model", str(model), "--batch-size", "4", "--cpus-per-worker", "1",
                           "--validation-share", "0.3", "--learning-rate", "1e-3"]) == 0
    metrics = json.loads((tmp_path / "trained" / "metrics.json").read_text())
    assert metrics["train_questions"] + metrics["validation_questions"] == len(training_pairs(mined, 1))
    assert 0 <= metrics["after"]["recall@1"] <= metrics["after"]["recall@5"] <= 1
    assert metrics["training_dropout"] == "cheap"  # on CPU by default
    before, after = Embedder(str(model)), Embedder(str(tmp_path / "trained" / "model"))
    assert not np.allclose(before.embed(["warfarin"]), after.embed(["warfarin"]))

    assert train_embedder(["--train-file", str(tmp_path / "none.json")]) == 2
    assert library_job(["mine", "--data", str(data), "--output", str(out), "--absent-articles", "1"]) == 2


def build_embedder_dir(directory):
    from conftest import build_tiny_model

    return build_tiny_model(directory)


def test_the_embedder_loss_masks_a_candidate_that_answers_the_question_too(tiny_model_dir):
    from transformers import AutoModel

    from qa_common.modeling import load_tokenizer

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), AutoModel.from_pretrained(tiny_model_dir).eval()
    shared = "warfarin slows blood clotting"
    pairs = [{"question": "what slows clotting", "positive": shared, "answering": [shared], "negatives": ["hand hygiene"]},
             {"question": "what does warfarin slow", "positive": "blood clotting and inr",
              "answering": ["blood clotting and inr", shared], "negatives": []}]
    with torch.no_grad():
        loss = pair_loss(model, tokenizer, pairs, scale=20.0)
        from qa_common.library.embedding import embed_batch, tokenize_for_embedding
        q = embed_batch(model, tokenize_for_embedding(tokenizer, [p["question"] for p in pairs]))
        c = embed_batch(model, tokenize_for_embedding(tokenizer, [shared, "hand hygiene", "blood clotting and inr"]))
        scores = 20.0 * q @ c.T
        scores[1, 0] = float("-inf")  # the second question's other answering passage is no negative
        expected = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert training_pairs([{"id": "a/0", "group": "a", "question": "q", "context": "x",
                            "answers": {"text": [], "answer_start": []}}], 1) == []


def test_the_cached_loss_has_the_gradients_of_one_graph_over_its_mini_batches(tiny_model_dir):
    import contextlib

    from transformers import AutoModel

    from qa_common.library.embedding import embed_batch, tokenize_for_embedding
    from qa_common.modeling import load_tokenizer
    from train_job.embedder import _batch_targets, _in_batch_loss

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), AutoModel.from_pretrained(tiny_model_dir)
    pairs = [{"question": "what slows clotting", "positive": "warfarin slows blood clotting",
              "answering": ["warfarin slows blood clotting"], "negatives": ["hand hygiene"]},
             {"question": "what does warfarin slow", "positive": "blood clotting and inr",
              "answering": ["blood clotting and inr"], "negatives": ["hand hygiene", "bleeding on admission"]},
             {"question": "who was given warfarin", "positive": "the patient was given warfarin",
              "answering": ["the patient was given warfarin"], "negatives": []}]

    def gradients():
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return grads

    def cached(mini_batch):
        torch.manual_seed(0)
        return cached_pair_loss_backward(model, tokenizer, pairs, 20.0, mini_batch, contextlib.nullcontext())

    # Dropout on: the gradients of one graph over the same mini-batches drawn from the same seed, so the
    # second pass replays the first pass's dropout masks.
    model.train()
    candidates, target, mask = _batch_targets(pairs)
    texts = [pair["question"] for pair in pairs] + candidates
    torch.manual_seed(0)
    embedded = torch.cat([embed_batch(model, tokenize_for_embedding(tokenizer, texts[i : i + 2]))
                          for i in range(0, len(texts), 2)])
    reference = _in_batch_loss(embedded[: len(pairs)], embedded[len(pairs) :], target, mask, 20.0)
    reference.backward()
    expected = gradients()
    assert cached(2) == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(gradients(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # Dropout off: whatever the mini-batch, the whole batch's loss and gradients.
    model.eval()
    loss = pair_loss(model, tokenizer, pairs, 20.0)
    loss.backward()
    expected = gradients()
    for mini_batch in (1, 3, 100):
        assert cached(mini_batch) == pytest.approx(loss.item(), rel=1e-5)
        for got, want in zip(gradients(), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
