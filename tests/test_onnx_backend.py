"""ONNX Runtime backends: export round trip, int8 accuracy on clear answers, backend choice, serving.

One export of a copy of the tiny model for the module (fp32 optimised + int8, measured on the fixture
questions); one local Serve for the HTTP test.
"""

import json
import shutil

import httpx
import numpy as np
import pytest
from serve_helpers import AUTH, SMALL_QA, service_config, serving

from conftest import FIXTURES
from qa_common import QAConfig, Question, answer_questions, predict_logits, prepare_eval_features
from qa_common.backends import EXPORT_RECORD_FILE, choose_backend, load_runner
from qa_common.export_onnx import CARD_HEADING, INT8_RECIPES, main as export_main
from qa_common.inference import OnnxRunner, TorchRunner
from serve_app.app import build_app
from serve_app.model import load_model
from bench.local_service import free_port
from serve_app.settings import ServeArgs

pytest.importorskip("onnx", reason="exporting needs the onnx package (the onnx extra, part of dev)")


@pytest.fixture(scope="module")
def exported_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model with model.onnx, model.int8.onnx and onnx_export.json, written by the CLI."""
    directory = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "qa_config.json").write_text(json.dumps(SMALL_QA))
    assert export_main([str(directory), "--optimize", "--int8", "--validation-file",
                        str(FIXTURES / "tiny-squad.json")]) == 0
    return directory


@pytest.fixture(scope="module")
def runners(exported_dir):
    torch_runner, tokenizer, _ = load_runner(str(exported_dir), "torch")
    onnx_runner, _, _ = load_runner(str(exported_dir), "onnx", threads=1)
    int8_runner, _, _ = load_runner(str(exported_dir), "onnx-int8", threads=1)
    return {"torch": torch_runner, "onnx": onnx_runner, "onnx-int8": int8_runner}, tokenizer


def test_export_writes_the_files_the_record_and_the_model_card(exported_dir):
    record = json.loads((exported_dir / EXPORT_RECORD_FILE).read_text())
    assert (exported_dir / "model.onnx").stat().st_size == record["onnx"]["bytes"]
    assert (exported_dir / "model.int8.onnx").stat().st_size < record["onnx"]["bytes"]
    assert record["onnx"]["optimized"] and record["onnx"]["fused_operators"]["Attention"] == 2  # one per layer
    assert record["validation"] == {"file": "tiny-squad.json", "questions": 13, "windows": record["validation"]["windows"]}
    assert record["onnx-int8"]["recipe"] in INT8_RECIPES and set(record["onnx-int8"]["recipes_tried"]) == set(INT8_RECIPES)
    for backend in ("onnx", "onnx-int8"):
        entry = record[backend]
        assert entry["f1_loss"] == pytest.approx(record["torch"]["f1"] - entry["f1"])
        assert 0 <= entry["start_agreement"] <= 1 and entry["windows_per_s"] > 0
    assert record["onnx"]["f1_loss"] == 0 and record["onnx"]["max_abs_logit_diff"] < 1e-4
    card = (exported_dir / "README.md").read_text()
    assert card.count(CARD_HEADING) == 1 and "| onnx-int8 | model.int8.onnx |" in card


def test_an_abstaining_model_exports_on_squad_v2_data_scored_with_its_own_threshold(tiny_model_dir, tmp_path):
    from qa_common import QAConfig, Question, answer_questions, load_model_and_tokenizer, read_squad, squad_v2_metrics

    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    config = QAConfig(**SMALL_QA, version_2_with_negative=True, no_answer_threshold=0.5)
    (directory / "qa_config.json").write_text(json.dumps(config.to_dict()))
    v2 = FIXTURES / "tiny-squad-v2.json"
    assert export_main([str(directory), "--int8", "--validation-file", str(v2)]) == 0
    record = json.loads((directory / EXPORT_RECORD_FILE).read_text())
    # PyTorch's F1 is the SQuAD 2.0 F1 of the answers as the model serves them (abstaining at its threshold).
    records = read_squad(v2)
    model, tokenizer = load_model_and_tokenizer(str(directory))
    served = answer_questions(model.eval(), tokenizer, [Question(r["question"], r["context"]) for r in records], config)
    expected = squad_v2_metrics({r["id"]: best[0]["answer"] for r, best in zip(records, served)},
                                {r["id"]: r["answers"]["text"] for r in records})
    assert record["torch"]["f1"] == pytest.approx(expected["f1"])
    assert record["onnx-int8"]["f1_loss"] == pytest.approx(record["torch"]["f1"] - record["onnx-int8"]["f1"])


def test_export_without_validation_records_agreement_only_and_replaces_the_card_section(tiny_model_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "README.md").write_text("# Card\n\n## Use\n\nAsk it.\n")
    for flags in (["--int8"], []):
        assert export_main([str(directory), *flags]) == 0
    assert not (directory / "model.int8.onnx").exists()  # the earlier int8 file went with its record
    record = json.loads((directory / EXPORT_RECORD_FILE).read_text())
    assert "f1_loss" not in record["onnx"] and record["onnx"]["start_agreement"] == 1.0
    assert not record["onnx"]["optimized"] and "onnx-int8" not in record
    card = (directory / "README.md").read_text()
    assert card.startswith("# Card\n\n## Use\n\nAsk it.\n") and card.count(CARD_HEADING) == 1
    assert load_runner(str(directory), "auto")[2]["backend"] == "torch"  # no F1 measured: auto keeps PyTorch


def test_onnx_fp32_logits_equal_torch(runners, fixture_records):
    by_backend, tokenizer = runners
    features = prepare_eval_features([r["id"] for r in fixture_records], [r["question"] for r in fixture_records],
                                     [r["context"] for r in fixture_records], tokenizer, QAConfig(**SMALL_QA))
    torch_logits = predict_logits(by_backend["torch"], features, batch_size=4)
    onnx_logits = predict_logits(by_backend["onnx"], features, batch_size=4)
    real = features["attention_mask"].astype(bool)
    for ours, theirs in zip(onnx_logits, torch_logits):
        np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)


def test_every_backend_answers_in_the_same_format_with_exact_offsets(runners, fixture_records):
    by_backend, tokenizer = runners
    questions = [Question(r["question"], r["context"], top_k=3) for r in fixture_records]
    results = {name: answer_questions(runner, tokenizer, questions, QAConfig(**SMALL_QA), batch_size=4)
               for name, runner in by_backend.items()}
    for name, answers_per_question in results.items():
        for question, answers in zip(questions, answers_per_question):
            assert 1 <= len(answers) <= 3, name
            for answer in answers:
                assert set(answer) == {"answer", "score", "start", "end", "no_answer_probability"}
                assert isinstance(answer["start"], int) and isinstance(answer["score"], float)
                assert question.context[answer["start"] : answer["end"]] == answer["answer"]
    for torch_answers, onnx_answers in zip(results["torch"], results["onnx"]):
        assert [(a["start"], a["end"]) for a in onnx_answers] == [(a["start"], a["end"]) for a in torch_answers]
        assert [a["score"] for a in onnx_answers] == pytest.approx([a["score"] for a in torch_answers], rel=1e-4)


def test_int8_answers_equal_torch_where_the_margin_is_clear(runners, fixture_records, exported_dir):
    by_backend, tokenizer = runners
    config = QAConfig(**SMALL_QA)
    questions = [Question(r["question"], r["context"], top_k=2) for r in fixture_records]
    torch_answers = answer_questions(by_backend["torch"], tokenizer, questions, config)
    int8_answers = answer_questions(by_backend["onnx-int8"], tokenizer, questions, config)
    # A span's score is exp(start + end log-softmax); each moves by at most 2 * max_abs_logit_diff with int8, so
    # two spans' log-score gap moves by at most 8x it: above that margin the best span cannot change.
    bound = 8 * json.loads((exported_dir / EXPORT_RECORD_FILE).read_text())["onnx-int8"]["max_abs_logit_diff"]
    clear = [i for i, answers in enumerate(torch_answers)
             if len(answers) == 1 or np.log(answers[0]["score"] / answers[1]["score"]) > bound]
    assert len(clear) >= 3, "the fixture should hold some clear answers for this model"
    for i in clear:
        assert (int8_answers[i][0]["start"], int8_answers[i][0]["end"]) == (torch_answers[i][0]["start"], torch_answers[i][0]["end"])


@pytest.mark.parametrize(("int8_loss", "onnx_loss", "expected"), [
    (0.5, 0.0, "onnx-int8"),   # within the bound and fastest
    (1.0, 0.0, "onnx-int8"),   # exactly at the bound
    (1.5, 0.0, "onnx"),        # int8 loses too much: the fastest of the rest
    (1.5, 2.0, "torch"),       # nothing qualifies
    (None, None, "torch"),     # exported without a validation set: nothing measured, nothing trusted
])
def test_auto_picks_int8_only_within_the_bound(int8_loss, onnx_loss, expected):
    record = {"torch": {"windows_per_s": 10.0}, "onnx": {"windows_per_s": 12.0, "f1_loss": onnx_loss},
              "onnx-int8": {"windows_per_s": 20.0, "f1_loss": int8_loss}}
    assert choose_backend(record, device="cpu", max_f1_loss=1.0) == expected
    assert choose_backend(record, device="cuda", max_f1_loss=1.0) == "torch"


def test_auto_skips_the_fastest_backend_when_it_is_slower_than_torch():
    record = {"torch": {"windows_per_s": 30.0}, "onnx-int8": {"windows_per_s": 20.0, "f1_loss": 0.1}}
    assert choose_backend(record, device="cpu") == "torch"
    assert choose_backend({}, device="cpu") == "torch"


def test_serving_loads_each_backend_in_one_method(exported_dir):
    record = json.loads((exported_dir / EXPORT_RECORD_FILE).read_text())
    expected_auto = choose_backend(record, device="cpu", max_f1_loss=1.0)
    for backend, runs, dtype in [("torch", "torch", "float32"), ("onnx", "onnx", "float32"),
                                 ("onnx-int8", "onnx-int8", "int8"), ("auto", expected_auto, None)]:
        runner, tokenizer, info = load_model(str(exported_dir), ServeArgs(model=str(exported_dir), backend=backend),
                                             device="cpu", threads=1)
        assert info["backend"] == runs and info["backend_requested"] == backend and info["threads"] == 1  # as it runs
        assert dtype is None or info["dtype"] == dtype
        assert isinstance(runner, TorchRunner if runs == "torch" else OnnxRunner) and tokenizer.is_fast


def test_a_missing_onnx_file_is_a_clear_startup_error(tiny_model_dir):
    for backend, flag in (("onnx", "--optimize"), ("onnx-int8", "--int8")):
        with pytest.raises(FileNotFoundError, match=rf"python -m qa_common.export_onnx .*{flag}"):
            build_app(ServeArgs(model=str(tiny_model_dir), backend=backend), {})
    with pytest.raises(FileNotFoundError, match="model.int8.onnx"):
        load_runner(str(tiny_model_dir), "onnx-int8")


def test_auto_ignores_a_recorded_backend_whose_file_is_gone(exported_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(exported_dir, directory)
    record = json.loads((directory / EXPORT_RECORD_FILE).read_text())
    record["onnx-int8"].update(f1_loss=0.0, windows_per_s=1e9)
    (directory / EXPORT_RECORD_FILE).write_text(json.dumps(record))
    assert load_runner(str(directory), "auto")[2]["backend"] == "onnx-int8"
    (directory / "model.int8.onnx").unlink()
    assert load_runner(str(directory), "auto")[2]["backend"] != "onnx-int8"


def test_the_service_answers_with_the_int8_backend_and_says_so(exported_dir, runners, fixture_records):
    from ray import serve

    from serve_app.app import APP_NAME, MODEL_DEPLOYMENT

    by_backend, tokenizer = runners
    record = fixture_records[0]
    [expected] = answer_questions(by_backend["onnx-int8"], tokenizer, [Question(record["question"], record["context"])],
                                  QAConfig(**SMALL_QA))
    # two intra-op threads on a replica that reserves half a CPU (reader_threads), as the replica's session runs them
    config = service_config(exported_dir, free_port(), backend="onnx-int8", reader_threads=2)
    with serving(config) as url:
        info = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=60).json()
        assert (info["backend"], info["backend_requested"], info["dtype"], info["threads"]) == ("onnx-int8", "onnx-int8", "int8", 2)
        replica = serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME).describe.remote().result()
        assert (replica["backend"], replica["threads"]) == ("onnx-int8", 2)
        served = httpx.post(f"{url}/v1/answer", json={"question": record["question"], "context": record["context"]},
                            headers=AUTH, timeout=60).json()
    assert [served[key] for key in ("answer", "start", "end")] == [expected[0][key] for key in ("answer", "start", "end")]
    assert served["score"] == pytest.approx(expected[0]["score"], rel=1e-4)
