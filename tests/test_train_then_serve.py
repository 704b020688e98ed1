"""A trained and exported model, served with no QA overrides, decodes with the settings it was trained with."""

import json

import httpx
import pytest
from serve_helpers import AUTH, service_config, serving
from test_train_job import tiny_config

from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config, read_squad
from conftest import FIXTURES, shared_ray
from bench.local_service import free_port


@pytest.fixture(scope="module")
def exported_model(tiny_model_dir, tmp_path_factory):
    from qa_common import QAConfig
    from train_job.run import run

    output = tmp_path_factory.mktemp("trained")
    # Not QAConfig's defaults, so that serving the defaults would show.
    qa = QAConfig(max_length=40, stride=12, max_question_length=16, n_best=5, max_answer_length=6)
    shared_ray()
    with pytest.MonkeyPatch.context() as patch:  # 13 validation questions: let the score map be fitted
        patch.setattr("qa_common.calibration.paragraphs.MIN_SCORE_QUESTIONS", 5)
        run(tiny_config(tiny_model_dir, output, num_workers=1, epochs=1, qa=qa))
    return output / "model", qa


def test_serving_an_exported_model_uses_its_trained_qa_config(exported_model):
    model_dir, trained_qa = exported_model
    from qa_common.config import FITTED_SETTINGS

    saved = json.loads((model_dir / "qa_config.json").read_text())
    chosen = {name: value for name, value in trained_qa.to_dict().items() if name not in FITTED_SETTINGS}
    assert {name: saved[name] for name in chosen} == chosen
    calibration = json.loads((model_dir.parent / "metrics.json").read_text())["calibration"]
    assert len(saved["score_calibration"]) == calibration["score_knots"] > 0  # fitted at export

    records = read_squad(FIXTURES / "tiny-squad.json")[:3]
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    expected = answer_questions(model, tokenizer, [Question(r["question"], r["context"], top_k=2) for r in records],
                                load_qa_config(model_dir))
    with serving(service_config(model_dir, free_port(), qa={})) as url:
        info = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=60).json()
        assert {name: info[name] for name in saved} == saved
        for record, wanted in zip(records, expected):
            body = {"question": record["question"], "context": record["context"], "top_k": 2}
            served = httpx.post(f"{url}/v1/answer", json=body, headers=AUTH, timeout=60).json()
            assert [(a["answer"], a["start"], a["end"]) for a in served] == [
                (a["answer"], a["start"], a["end"]) for a in wanted
            ]
            assert [a["score"] for a in served] == pytest.approx([a["score"] for a in wanted], rel=1e-4)
