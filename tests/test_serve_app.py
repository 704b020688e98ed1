"""The QA service (serve_app) on the session's local Ray with the tiny model.

One application for the module on the session's Ray + Serve: answers and their offsets, equality
with qa_common's own decoding, dynamic batching, input validation, the page and docs (scale to zero
is checked on test_serve_update's service); plus the config handling of the CLI and the application
builder, and served snapshots, which need no Ray.
"""

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest
from serve_helpers import AUTH, SMALL_QA, service_config, serving

from bench.local_service import free_port, replica_counts

from qa_common import QAConfig, Question, answer_questions, prepare_eval_features
from serve_app.__main__ import configure, parse_args
from serve_app.app import APP_NAME, INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, build_app, deployment_options, load_serve_config
from serve_app.settings import ServeArgs

MAX_BODY_BYTES = 65_536
MAX_CONTEXT_CHARS = 20_000


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    config = service_config(
        tiny_model_dir, free_port(),
        # A long batch wait so that concurrent requests reliably land in shared batches.
        batch_wait_timeout_s=0.3, max_body_bytes=MAX_BODY_BYTES, max_context_chars=MAX_CONTEXT_CHARS,
    )
    with serving(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def decode_directly(tiny_model_and_tokenizer):
    """qa_common's answers for the same questions with the service's settings."""
    model, tokenizer = tiny_model_and_tokenizer
    return lambda questions: answer_questions(model, tokenizer, questions, QAConfig(**SMALL_QA))


def assert_same_answer(served: dict, expected: dict, context: str) -> None:
    assert set(served) == {"answer", "score", "start", "end", "no_answer_probability"}
    assert context[served["start"] : served["end"]] == served["answer"]
    assert 0.0 <= served["score"] <= 1.0
    assert [served[key] for key in ("answer", "start", "end")] == [expected[key] for key in ("answer", "start", "end")]
    for key in ("score", "no_answer_probability"):
        assert served[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7)


# --- configuration, no Ray needed -------------------------------------------------------------


def test_packaged_config_is_a_valid_serve_config_that_scales_to_zero():
    from ray.serve.schema import ServeDeploySchema

    config = load_serve_config()
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "serve_app.app:app_builder"
    model = deployment_options(app)[MODEL_DEPLOYMENT]
    assert model["autoscaling_config"]["min_replicas"] == 0
    assert model["autoscaling_config"]["downscale_to_zero_delay_s"] == 3600
    assert model["max_ongoing_requests"] >= ServeArgs(**app["args"]).max_batch_size
    assert model["max_ongoing_requests"] > model["autoscaling_config"]["target_ongoing_requests"]


def test_cli_flags_override_the_config(tiny_model_dir):
    flags = parse_args([
        "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "9001", "--max-batch-size", "16",
        "--downscale-to-zero-delay-s", "60", "--num-gpus", "1", "--dtype", "float16", "--max-length", "256",
        "--n-best", "5",
    ])
    config = configure(load_serve_config(), flags)
    [app] = config["applications"]
    model = deployment_options(app)[MODEL_DEPLOYMENT]
    assert config["http_options"]["host"] == "0.0.0.0" and config["http_options"]["port"] == 9001
    assert app["args"]["model"] == str(tiny_model_dir.resolve())
    assert app["args"]["max_batch_size"] == 16 and app["args"]["dtype"] == "float16"
    assert app["args"]["qa"] == {"max_length": 256, "n_best": 5}  # QA flags are QAConfig overrides
    assert model["autoscaling_config"]["downscale_to_zero_delay_s"] == 60
    assert model["autoscaling_config"]["min_replicas"] == 0  # untouched keys stay
    assert model["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}


def test_on_one_machine_the_reader_borrows_the_retrievers_cpus(tiny_model_dir, tmp_path):
    def reader_threads(*argv: str):
        [app] = configure(load_serve_config(), parse_args(["--model", str(tiny_model_dir), *argv]))["applications"]
        return app["args"].get("reader_threads")

    library = str(tmp_path / "library")
    assert reader_threads("--library", library) == 2  # the packaged config: one CPU for each
    assert reader_threads("--library", library, "--num-cpus", "2") == 3
    assert reader_threads("--library", library, "--reader-threads", "1") == 1  # the operator's word stands
    assert reader_threads() is None  # no library: one thread per CPU a replica reserves
    assert reader_threads("--library", library, "--address", "auto") is None  # a cluster: replicas on other nodes


def test_every_application_setting_has_a_flag_and_lands_in_args(tiny_model_dir):
    values = {"forward_batch_size": 7, "max_context_chars": 5000, "max_windows_per_call": 9, "retry_after_s": 4,
              "max_f1_loss": 0.25, "model_name": "demo", "insecure_no_auth": True, "backend": "torch"}
    assert set(ServeArgs.model_fields) - {"model", "qa"} >= set(values)
    argv = ["--model", str(tiny_model_dir)]
    for name, value in values.items():
        argv += [f"--{name.replace('_', '-')}"] if value is True else [f"--{name.replace('_', '-')}", str(value)]
    [app] = configure(load_serve_config(), parse_args(argv))["applications"]
    assert {name: app["args"][name] for name in values} == values
    flags = vars(parse_args([]))
    # a flag for every field but the QA overrides (flags of their own) and what `update` records
    assert all(name in flags for name in ServeArgs.model_fields if name not in ("qa", "previous_model"))
    # The config file holds overrides only: every default comes from ServeArgs.
    [packaged] = load_serve_config()["applications"]
    assert set(packaged["args"]) == {"model"}


def test_the_packaged_model_is_what_the_quickstart_exports_and_citations_are_the_index_columns():
    from qa_common.library.index import CITATION_FIELDS, PASSAGE_COLUMNS
    from serve_app.schemas import Citation
    from train_job import run_dir
    from train_job.config import TrainConfig

    [packaged] = load_serve_config()["applications"]
    assert packaged["args"]["model"] == f"{TrainConfig.__dataclass_fields__['output_dir'].default}/{run_dir.MODEL}"
    assert set(Citation.model_fields) == {*CITATION_FIELDS, "passage"}
    assert PASSAGE_COLUMNS == (*CITATION_FIELDS, "text")


def test_a_served_model_is_a_read_only_copy_named_by_the_hash_of_every_file(tiny_model_dir, tmp_path):
    import shutil

    from serve_app.snapshot import display_name, snapshot, version_of

    model = tmp_path / "run" / "model"
    shutil.copytree(tiny_model_dir, model)
    first = Path(snapshot(str(model)))
    assert first.parent == tmp_path / "run" / ".served-models" and display_name(first) == "run"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in model.iterdir())
    assert all(not p.stat().st_mode & 0o222 for p in [first, *first.iterdir()])  # nobody writes it in place
    assert snapshot(str(model)) == str(first) and snapshot(str(first)) == str(first)  # taken once
    (model / "vocab.txt").write_text((model / "vocab.txt").read_text() + "newword\n")  # any file counts
    second = Path(snapshot(str(model), str(tmp_path / "elsewhere")))
    assert second.parent == tmp_path / "elsewhere" and version_of(second) != version_of(first)
    assert version_of(first) == first.name.split("@")[1] and len(version_of(first)) == 12
    with pytest.raises(FileNotFoundError, match="pinned revision"):
        build_app({"model": "some-org/some-model"}, {})


def test_without_a_model_the_cli_says_to_train_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m train_job"):
        configure(load_serve_config(), parse_args([]))


def test_builder_rejects_unknown_or_impossible_qa_settings(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown QA setting"):
        build_app({"model": str(tiny_model_dir), "qa": {"window": 3}}, {})
    with pytest.raises(ValueError, match="stride"):
        build_app({"model": str(tiny_model_dir), "qa": {"stride": 400}}, {})


def test_builder_rejects_a_missing_model_and_batches_that_cannot_fill(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train_job"):
        build_app({"model": str(tmp_path / "nothing-here")}, {})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app({"model": str(tiny_model_dir), "max_batch_size": 16}, {MODEL_DEPLOYMENT: {"max_ongoing_requests": 8}})
    with pytest.raises(ValueError, match="library_job build"):
        build_app({"model": str(tiny_model_dir), "library": str(tmp_path / "no-index")}, {MODEL_DEPLOYMENT: {"max_ongoing_requests": 32}})
    # From the command line: exit 2 and what to fix, before any Ray starts.
    from serve_app.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--model", str(tiny_model_dir), "--library", str(tmp_path / "no-index")])
    assert exited.value.code == 2 and "library_job build" in capsys.readouterr().err


# --- the running service ----------------------------------------------------------------------


def test_answers_have_offsets_into_the_context_and_equal_qa_common(client, fixture_records, decode_directly,
                                                                    tiny_model_and_tokenizer):
    records = fixture_records[:4]
    _, tokenizer = tiny_model_and_tokenizer
    first = records[0]
    windows = prepare_eval_features(["0"], [first["question"]], [first["context"]], tokenizer, QAConfig(**SMALL_QA))
    assert len(windows["input_ids"]) > 1, "the test needs a context that spans several windows"

    expected = decode_directly([Question(r["question"], r["context"], top_k=3) for r in records])
    for record, expected_answers in zip(records, expected):
        single = client.post("/v1/answer", json={"question": record["question"], "context": record["context"]})
        assert single.status_code == 200, single.text
        assert_same_answer(single.json(), expected_answers[0], record["context"])

        top = client.post("/v1/answer", json={"question": record["question"], "context": record["context"], "top_k": 3})
        assert top.status_code == 200, top.text
        assert isinstance(top.json(), list) and len(top.json()) == len(expected_answers)
        for served, wanted in zip(top.json(), expected_answers):
            assert_same_answer(served, wanted, record["context"])


def test_a_model_that_does_not_abstain_answers_as_before(client, fixture_records, decode_directly):
    # The tiny model's qa_config.json has no abstention: by default, and with allow_no_answer false, it
    # always returns a span, exactly the SQuAD 1.1 decoding.
    for record in fixture_records[:3]:
        body = {"question": record["question"], "context": record["context"], "top_k": 3}
        [expected] = decode_directly([Question(record["question"], record["context"], top_k=3, allow_no_answer=False)])
        for served in (client.post("/v1/answer", json=body).json(),
                       client.post("/v1/answer", json={**body, "allow_no_answer": False}).json()):
            assert all(answer["start"] >= 0 and answer["answer"] for answer in served)
            for answer, wanted in zip(served, expected, strict=True):
                assert_same_answer(answer, wanted, record["context"])


def test_a_list_of_questions_is_answered_in_order(client, fixture_records, decode_directly):
    records = fixture_records[4:7]
    payload = [{"question": r["question"], "context": r["context"], "top_k": k} for r, k in zip(records, (1, 2, 1))]
    payload[2]["max_answer_length"] = 2
    response = client.post("/v1/answer", json=payload)
    assert response.status_code == 200, response.text
    served = response.json()
    expected = decode_directly(
        [Question(p["question"], p["context"], p["top_k"], p.get("max_answer_length")) for p in payload]
    )
    assert len(served) == 3 and isinstance(served[0], dict) and isinstance(served[1], list)
    assert_same_answer(served[0], expected[0][0], payload[0]["context"])
    for answer, wanted in zip(served[1], expected[1]):
        assert_same_answer(answer, wanted, payload[1]["context"])
    assert_same_answer(served[2], expected[2][0], payload[2]["context"])


def model_calls() -> int:
    from ray import serve

    return serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME).describe.remote().result()["model_calls"]


def test_concurrent_requests_share_model_calls(client, service, fixture_records, decode_directly):
    records = fixture_records[:8]
    calls_before = model_calls()

    def ask(record):
        body = {"question": record["question"], "context": record["context"]}
        return httpx.post(f"{service}/v1/answer", json=body, timeout=60, headers=AUTH)

    with concurrent.futures.ThreadPoolExecutor(len(records)) as pool:
        responses = list(pool.map(ask, records))
    calls = model_calls() - calls_before

    expected = decode_directly([Question(r["question"], r["context"]) for r in records])
    for record, response, wanted in zip(records, responses, expected):
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), wanted[0], record["context"])
    assert 1 <= calls < len(records), f"{len(records)} concurrent requests took {calls} model calls"


def test_health_and_model_description(client, tiny_model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    # The model's name and version, never where it lives on the server.
    assert info["name"] == tiny_model_dir.name and str(tiny_model_dir) not in json.dumps(info)
    assert "/" not in json.dumps(info)
    assert info["max_length"] == SMALL_QA["max_length"] and info["stride"] == SMALL_QA["stride"]
    assert info["max_answer_length"] == QAConfig().max_answer_length
    assert len(info["version"]) == 12 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["limits"]["context_chars"] == MAX_CONTEXT_CHARS and info["limits"]["questions_per_request"] == 64


CONTEXT = "Warfarin was stopped on admission because of bleeding."
OK = {"question": "Which drug was stopped?", "context": CONTEXT}
OVERSIZED = json.dumps({**OK, "context": "x " * MAX_BODY_BYTES})


def _chunks(data: bytes):
    yield from (data[i : i + 4096] for i in range(0, len(data), 4096))


BAD_REQUESTS = {
    "missing question": (json.dumps({"context": CONTEXT}), 422, "question: Field required"),
    "missing context": (json.dumps({"question": "Why?"}), 422, "context: Field required"),
    "empty question": (json.dumps({**OK, "question": ""}), 422, "question:"),
    "blank context": (json.dumps({**OK, "context": " \n\t "}), 422, "context: must contain some text"),
    "question not a string": (json.dumps({**OK, "question": 42}), 422, "question: Input should be a valid string"),
    "top_k as a string": (json.dumps({**OK, "top_k": "3"}), 422, "top_k: Input should be a valid integer"),
    "top_k too large": (json.dumps({**OK, "top_k": 21}), 422, "top_k: Input should be less than or equal to 20"),
    "top_k a boolean": (json.dumps({**OK, "top_k": True}), 422, "top_k"),
    "max_answer_length zero": (json.dumps({**OK, "max_answer_length": 0}), 422, "max_answer_length"),
    "allow_no_answer a string": (json.dumps({**OK, "allow_no_answer": "yes"}), 422, "allow_no_answer"),
    # "\ud800" is half a UTF-16 pair: valid JSON, but no text the tokenizer could take.
    "unpaired surrogate": ('{"question": "Why\\ud800?", "context": "x"}', 422, "question: Input should be a valid"),
    "unknown field": (json.dumps({**OK, "topk": 2}), 422, "topk: unknown field"),
    "question too long": (json.dumps({**OK, "question": "why " * 300}), 422, "question: String should have at most"),
    "context over the cap": (json.dumps({**OK, "context": "x" * (MAX_CONTEXT_CHARS + 1)}), 422, "limit of 20,000"),
    "body a JSON string": (json.dumps("Which drug?"), 422, "must be a JSON object or a list"),
    "empty list": ("[]", 422, "at least 1 item"),
    "list item not an object": (json.dumps([OK, 7]), 422, "[1]: must be a JSON object"),
    "list item invalid": (json.dumps([OK, {**OK, "top_k": 0}]), 422, "[1].top_k"),
    "too many questions": (json.dumps([OK] * 65), 422, "at most 64 items"),
    "malformed JSON": ('{"question": "Why?", ', 400, "not valid JSON"),
    "empty body": ("", 400, "body is empty"),
    "not UTF-8": (b'{"question": "caf\xe9?", "context": "x"}', 400, "not UTF-8"),
    "oversized body": (OVERSIZED, 413, "limit of 65,536 bytes"),
    # Streamed without a Content-Length header: the cap holds on the bytes actually read.
    "oversized streamed body": (_chunks(OVERSIZED.encode()), 413, "limit of 65,536 bytes"),
}


@pytest.mark.parametrize("body, status, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_a_json_4xx_and_the_service_still_answers(client, body, status, message):
    response = client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.post("/v1/answer", json=OK).status_code == 200


def test_bad_requests_never_restarted_a_replica(client):
    assert replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {"RUNNING": 1}
    assert replica_counts(APP_NAME, INGRESS_DEPLOYMENT) == {"RUNNING": 1}


def test_unknown_paths_and_methods_get_json_errors(client):
    missing = client.get("/v2/answer")
    assert missing.status_code == 404 and "/docs" in missing.json()["error"]
    for no_library in (client.post("/v1/ask", json={"question": "x"}), client.get("/v1/collections")):
        assert no_library.status_code == 404 and "--library LIBRARY" in no_library.json()["error"]
    assert client.get("/v1/answer").status_code == 405 and "error" in client.get("/v1/answer").json()


def test_page_and_api_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="document"' in page.text and 'id="question"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    docs = client.get("/docs")
    assert docs.status_code == 200 and "http://" not in docs.text and "https://" not in docs.text
    for response in (page, docs):  # only their own scripts run, and no other site may frame them
        policy = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self' 'sha256-" in policy
        assert "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs/assets/{asset}" in docs.text
        served = client.get(f"/docs/assets/{asset}")
        assert served.status_code == 200 and len(served.content) > 100_000
    assert client.get("/docs/assets/..%2Fconfig.yaml").status_code == 404
    answer_route = client.get("/openapi.json").json()["paths"]["/v1/answer"]["post"]
    assert "question" in json.dumps(answer_route["requestBody"])
