"""Open-domain evaluation (python -m library_job evaluate): the fixture's paragraphs as a library, every
question asked of all of it, with the abstaining tiny model as the reader."""

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import FIXTURES
from qa_common import (PassagesQuestion, Question, answer_questions, load_model_and_tokenizer, load_qa_config,
                       passage_relevance, read_squad, save_qa_config)
from qa_common.calibration import answered_at_precision, expected_calibration_error
from qa_common.inference import question_logits
from qa_common.metric import question_scores, score_answer
from qa_common.splits import absent_articles
from library_job import squad_library
from library_job.__main__ import main as library_job


def test_every_question_is_asked_of_the_whole_library_and_scored_both_ways(abstaining_run, local_ray, tmp_path):
    # A model calibrated over passages (a threshold of its own there): served with it, reported without it too.
    # Round thresholds: training's sits exactly on one fixture question, where batching's float noise decides.
    model_dir = tmp_path / "model"
    shutil.copytree(abstaining_run[0] / "model", model_dir)
    save_qa_config(load_qa_config(model_dir).replace(no_answer_threshold=0.5,
                                                     passages_calibration={"no_answer_threshold": 0.35,
                                                                           "passage_rank_weight": 1.0}), model_dir)
    data = FIXTURES / "tiny-squad.json"
    records = read_squad(data)
    # One article's questions not asked (its paragraph stays), one of the other three out of the library.
    skipped = records[0]["title"]
    [absent] = absent_articles([r for r in records if r["title"] != skipped], 0.34, seed=0)
    skip_file = tmp_path / "calibrated-on.json"
    skip_file.write_text(json.dumps({"data": [r for r in records if r["title"] == skipped]}))
    assert library_job(["evaluate", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
                        "--passages", "2", "--concurrency", "1", "--absent-articles", "0.34",
                        "--skip-articles-of", str(skip_file)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    asked = [r for r in records if r["title"] != skipped]
    present = [r for r in asked if r["title"] != absent]
    assert metrics["questions"] == len(asked) and metrics["absent_questions"] == len(asked) - len(present) > 0
    assert metrics["documents"] == 3 and metrics["one_document_per"] == "paragraph"
    assert metrics["served_settings"] == {"no_answer_threshold": 0.35, "passage_rank_weight": 1.0,
                                          "score": "softmax share"}
    for mode in ("hybrid", "dense", "lexical"):
        recalls = [metrics[f"{mode}_recall@{k}"] for k in (1, 5, 20)]
        assert recalls == sorted(recalls) and recalls[-1] == 1.0  # three paragraphs: all are in the top 20
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "out" / "answers.jsonl").read_text().splitlines())}
    assert set(rows) == {r["id"] for r in asked}
    # The two passages read, as the reader ranks them: recall at depths up to two only.
    assert "reader_recall@5" not in metrics and metrics["reader_recall@1"] == pytest.approx(
        sum(rows[r["id"]]["reader_rank"] == 1 for r in present) / len(present), abs=1e-4)

    # Scored as the reader answers: with the gold paragraph alone, and over the passages the hybrid search read.
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    config = load_qa_config(model_dir)
    documents = squad_library.paragraph_documents([r for r in records if r["title"] != absent])
    alone = answer_questions(model, tokenizer, [Question(r["question"], r["context"]) for r in present], config)
    gold_f1 = [score_answer(a[0]["answer"], r["answers"]["text"])["f1"] for r, a in zip(present, alone)]
    assert metrics["gold_paragraph_f1"] == pytest.approx(100 * sum(gold_f1) / len(present), abs=0.01)
    assert metrics["gold_paragraph_f1"] > 50  # the tiny model learnt these questions
    for prefix, settings in (("", config), ("one_paragraph_", config.replace(passages_calibration={}))):
        read = answer_questions(model, tokenizer, [PassagesQuestion(r["question"], tuple(
            documents[name] for name in rows[r["id"]]["read"])) for r in asked], settings)
        # An absent article's question is answered right only by declining.
        golds = [[] if r["title"] == absent else r["answers"]["text"] for r in asked]
        f1 = [question_scores(a[0]["answer"], g)["v2_f1"] for a, g in zip(read, golds)]
        assert metrics[f"{prefix}served_f1"] == pytest.approx(100 * sum(f1) / len(asked), abs=0.01)
        assert [rows[r["id"]][f"{prefix}answer"] for r in asked] == [a[0]["answer"] for a in read]
        # The served response end to end: calibration error, selective answering, absent told apart.
        scores = [rows[r["id"]][f"{prefix}score"] for r in asked]
        right = [rows[r["id"]][f"{prefix}exact_match"] == 1 for r in asked]
        assert metrics[f"{prefix}score_ece"] == pytest.approx(expected_calibration_error(scores, right), abs=1e-4)
        assert metrics[f"{prefix}answered_at_80_precision"] == pytest.approx(answered_at_precision(scores, right, 0.8),
                                                                             abs=1e-4)
        assert metrics[f"{prefix}absent_no_answer_auc"] == pytest.approx(roc_auc_score(
            [r["title"] == absent for r in asked], [a[0]["no_answer_probability"] for a in read]), abs=1e-4)
        assert sum(b["count"] for b in metrics[f"{prefix}score_reliability"]) == len(asked)
    present_f1 = [rows[r["id"]]["f1"] for r in present]
    assert metrics["f1"] == pytest.approx(100 * sum(present_f1) / len(present), abs=0.01)
    assert (tmp_path / "out" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    for record in present:
        row = rows[record["id"]]
        assert len(row["read"]) == 2 and row["document"] == next(n for n, t in documents.items() if t == record["context"])
        assert (row["hybrid_rank"] == 1) == (row["read"][0] == row["document"])
        [logits] = question_logits(model, tokenizer, [PassagesQuestion(record["question"], tuple(
            documents[name] for name in row["read"]))], config)
        first = row["read"][int(np.argmax(passage_relevance(*logits, 2)))]
        assert (row["reader_rank"] == 1) == (first == row["document"])

    assert library_job(["evaluate", "--model", str(model_dir), "--data", str(tmp_path / "none.json"),
                        "--output", str(tmp_path / "x")]) == 2
    assert library_job(["evaluate", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "x"),
                        "--absent-articles", "1"]) == 2

    # Weighted fusion chosen on one article's questions, tested on the others' (bench smoke run).
    from bench import fusion_weights

    library = tmp_path / "out" / "library"
    assert fusion_weights.main(["--data", str(data), "--validation-articles-of", str(skip_file), "--validation-library",
                                str(library), "--test-library", str(library), "--out", str(tmp_path / "fusion.json")]) == 0
    fusion = json.loads((tmp_path / "fusion.json").read_text())
    assert fusion["settings"]["validation_questions"] == len(records) - len(asked)
    assert fusion["settings"]["test_questions"] == len(present)  # the absent article's are in no document
    weights = {row["weight"]: row for row in fusion["results"]["weights"]}
    assert fusion["ratios"]["chosen_dense_weight"] in weights and 0.5 in weights
    assert weights[0.5]["test_recall@20"] == 1.0

    # Embedders compared on a library of articles they were not mined from, and on the evaluated library:
    # the dense ranking computed in memory finds each question's document where the index's search did.
    from bench import embedder_choice
    from qa_common.library.embedding import EMBEDDER

    present_file = tmp_path / "present.json"
    present_file.write_text(json.dumps({"data": present}))
    assert embedder_choice.main(["--embedders", EMBEDDER, "--train-data", str(data), "--exclude-articles-of",
                                 str(skip_file), "--validation-articles", "2", "--test-data", str(present_file),
                                 "--test-library", str(library), "--output-dir", str(tmp_path / "choice"),
                                 "--out", str(tmp_path / "choice.json")]) == 0
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["settings"]["test_questions"] == len(present) and skipped not in choice["settings"]["validation_titles"]
    assert len(choice["settings"]["validation_titles"]) == 2 and choice["ratios"]["chosen"] == EMBEDDER
    for mode in ("dense", "hybrid"):
        ranks = [rows[r["id"]][f"{mode}_rank"] for r in present]
        assert choice["ratios"][f"test_{mode}_recall@1"] == sum(rank == 1 for rank in ranks) / len(ranks)


def test_a_squad_file_as_long_documents_and_real_documents_name_each_questions_document(tmp_path, capsys):
    records = read_squad(FIXTURES / "tiny-squad.json")
    documents, name_of = squad_library.squad_documents(records, "article")
    assert len(documents) == 4 and set(name_of) == {r["context"] for r in records}
    for record in records:  # the article's file holds the paragraph
        assert record["context"] in documents[name_of[record["context"]]]
    paragraphs, name_of = squad_library.squad_documents(records, "paragraph")
    assert paragraphs == squad_library.paragraph_documents(records) and len(name_of) == 4

    # Real documents: found by the text the library reads, whatever the layout's line breaks.
    by_title = {r["title"]: r["context"] for r in records}
    folder = tmp_path / "docs"
    (folder / "ward").mkdir(parents=True)
    (folder / "ward" / "warfarin.md").write_text("# Warfarin\n\n" + by_title["Warfarin"].replace(" ", "\n", 5))
    (folder / "stroke.html").write_text(f"<html><body><h1>Stroke</h1><p>{by_title['Stroke']}</p></body></html>")
    (folder / "other.txt").write_text("Nothing any question asks about.")
    found = squad_library.folder_documents(folder, set(by_title.values()))
    assert found == {by_title["Warfarin"]: "ward/warfarin.md", by_title["Stroke"]: "stroke.html"}
    assert library_job(["evaluate", "--model", str(tmp_path), "--data", str(FIXTURES / "tiny-squad.json"),
                        "--output", str(tmp_path / "x"), "--documents", str(tmp_path / "none")]) == 2
    assert "not a folder of documents" in capsys.readouterr().err
