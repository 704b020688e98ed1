"""What makes the QA service fit to expose in a hospital, on the session's local Ray with the tiny model.

The session's Ray + Serve, with two applications of this module ("qa", plus "tight": the same service
with tiny queues and a short deadline): tokens on every /v1/ route (the tokens themselves are
tests/test_serve_tokens.py's), window budgets, 503 + Retry-After when the queue is full or the
deadline passes, the audit log, metrics, the published schema, a fuzzer, and a model replica killed
under load. Last, no log of the session holds any of the patient text sent.
"""

import concurrent.futures
import json
import threading
import time

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_helpers import AUTH, TOKEN, service_config, serving

from bench.local_service import free_port, replica_counts, wait_until

from serve_app.app import APP_NAME, MODEL_DEPLOYMENT, build_app, deployment_options
from serve_app.auth import hash_token

# A made-up name in every document and question this module sends: it must never reach a log.
PATIENT = "Qwertzuiop"
CONTEXT = f"{PATIENT} was given warfarin on admission because of bleeding."
OK = {"question": f"Which drug was {PATIENT} given?", "context": CONTEXT}
MAX_WINDOWS = 40


@pytest.fixture(scope="module")
def metrics_port(service):
    from conftest import ray_metrics_port

    return ray_metrics_port()


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feedback") / "store"


@pytest.fixture(scope="module")
def service(tiny_model_dir, audit_log, feedback_dir):
    from ray import serve

    config = service_config(tiny_model_dir, free_port(), audit_log=str(audit_log), max_windows_per_request=MAX_WINDOWS,
                            feedback=str(feedback_dir))
    with serving(config) as url:
        # "tight": a replica holds 2 questions, 1 more may wait, and a lone question waits 1 s for
        # its batch to fill, past the 0.5 s deadline.
        [app] = service_config(tiny_model_dir, port=0)["applications"]
        options = deployment_options(app)
        options[MODEL_DEPLOYMENT].update(max_ongoing_requests=2, max_queued_requests=1, autoscaling_config={
            "min_replicas": 1, "max_replicas": 1,
        })
        args = {**app["args"], "max_batch_size": 2, "batch_wait_timeout_s": 1.0, "request_deadline_s": 0.5}
        serve.run(build_app(args, options), name="tight", route_prefix="/tight")
        yield url
        serve.delete("tight")


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service, timeout=60, headers=AUTH) as client:
        yield client


# --- the running service ------------------------------------------------------------------------


def test_v1_routes_need_a_token_and_the_page_does_not(service):
    for method, path in (("POST", "/v1/answer"), ("GET", "/v1/model")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            response = httpx.request(method, service + path, json=OK, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "token" in response.json()["error"]
    for path in ("/", "/healthz", "/docs", "/openapi.json"):
        assert httpx.get(service + path).status_code == 200, path


def test_nesting_huge_numbers_and_window_budget_get_4xx(client):
    deep = "[" * 50_000 + "]" * 50_000
    response = client.post("/v1/answer", content=deep)
    assert response.status_code == 400 and "too deeply" in response.json()["error"]
    response = client.post("/v1/answer", content='{"question": "a", "context": "b", "top_k": 1' + "0" * 5000 + "}")
    assert response.status_code == 400 and "number" in response.json()["error"]
    long_document = " ".join([CONTEXT] * 200)
    response = client.post("/v1/answer", json={**OK, "context": long_document})
    assert response.status_code == 413, response.text
    assert f"limit of {MAX_WINDOWS} per request" in response.json()["error"]
    assert PATIENT not in response.text
    assert client.post("/v1/answer", json=OK).status_code == 200


def test_a_full_queue_and_a_passed_deadline_get_503_with_retry_after(service):
    with httpx.Client(base_url=service + "/tight", timeout=60, headers=AUTH) as tight:
        # 6 questions at once: 2 run, 1 waits, the rest find the queue full.
        response = tight.post("/v1/answer", json=[OK] * 6)
        assert response.status_code == 503, response.text
        assert "queue is full" in response.json()["error"] and int(response.headers["retry-after"]) >= 1
        # A lone question waits 1 s for its batch to fill: past the 0.5 s deadline.
        response = tight.post("/v1/answer", json=OK)
        assert response.status_code == 503, response.text
        assert "deadline" in response.json()["error"] and int(response.headers["retry-after"]) >= 1
        assert replica_counts("tight", MODEL_DEPLOYMENT) == {"RUNNING": 1}


def test_every_request_leaves_one_json_audit_line_without_text(client, audit_log):
    marker = f"audit-{time.time_ns()}"
    sent = [
        client.post("/v1/answer", json=[OK, {**OK, "top_k": 2}], headers={"X-Request-Id": marker + "-ok"}),
        client.post("/v1/answer", json={**OK, "top_k": 0}, headers={"X-Request-Id": marker + "-bad"}),
        httpx.post(client.base_url.join("/v1/answer"), json=OK, headers={"X-Request-Id": marker + "-anon"}),
    ]
    assert [r.status_code for r in sent] == [200, 422, 401]

    from serve_app.request_ids import client_id_hash

    wanted = {client_id_hash(marker + suffix): suffix for suffix in ("-ok", "-bad", "-anon")}

    def lines():
        records = [json.loads(line) for line in audit_log.read_text().splitlines()]
        return {wanted[r["client_request_id_hash"]]: r for r in records if r.get("client_request_id_hash") in wanted}

    found = wait_until(lambda: len(lines()) == 3 and lines(), timeout_s=20, what="the audit lines")
    ok, bad, anonymous = (found[suffix] for suffix in ("-ok", "-bad", "-anon"))
    assert [found[suffix]["request_id"] for suffix in ("-ok", "-bad", "-anon")] == [
        r.headers["x-request-id"] for r in sent]  # the ids the service minted
    assert ok["status"] == 200 and ok["route"] == "/v1/answer" and ok["questions"] == 2 and ok["windows"] >= 2
    assert ok["token_id"] == hash_token(TOKEN)[:8] and len(ok["model_version"]) == 12
    assert ok["abstained"] == 0 and ok["latency_ms"] > 0 and ok["time"].endswith("+00:00")
    assert bad["status"] == 422 and bad["token_id"] == ok["token_id"]
    assert anonymous["status"] == 401 and anonymous["token_id"] is None
    assert PATIENT not in audit_log.read_text() and TOKEN not in audit_log.read_text()


def test_prometheus_metrics_count_requests_and_model_work(client, metrics_port):
    assert client.post("/v1/answer", json=[OK, OK]).status_code == 200

    def scraped():
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        wanted = ('ray_qa_requests_total{', 'ray_qa_questions_total', 'ray_qa_model_call_windows_bucket',
                  'ray_qa_model_batch_questions_bucket', 'ray_qa_model_call_seconds_bucket')
        return text if all(name in text for name in wanted) else None

    text = wait_until(scraped, timeout_s=90, what="the service's metrics on Ray's metrics export port", interval_s=2)
    answered = [line for line in text.splitlines() if line.startswith("ray_qa_requests_total{")
                and 'route="/v1/answer"' in line and 'status="200"' in line]
    assert answered and float(answered[0].rsplit(" ", 1)[1]) >= 1
    assert PATIENT not in text


def test_a_rating_is_stored_once_audited_by_id_and_counted_per_model_version(client, audit_log, feedback_dir,
                                                                             metrics_port):
    from serve_app.feedback.store import FeedbackStore

    answered = client.post("/v1/answer", json=[OK, {**OK, "top_k": 2}])
    receipts = answered.headers["x-response-id"].split(",")
    assert answered.status_code == 200 and len(receipts) == 2
    words = (CONTEXT.index("warfarin"), CONTEXT.index("warfarin") + len("warfarin"))
    body = {"response_id": receipts[1], "question": OK["question"], "context": CONTEXT, "verdict": "wrong",
            "correction": {"start": words[0], "end": words[1]}, "key": f"rating-{time.time_ns()}"}
    first = client.post("/v1/feedback", json=body)
    assert first.status_code == 201, first.text
    again = client.post("/v1/feedback", json=body)  # a retry: nothing new
    assert again.status_code == 200 and again.json() == {**first.json(), "created": False}
    refused = [client.post("/v1/feedback", json={**body, "response_id": receipts[0][:-4] + "AAAA"}),
               client.post("/v1/feedback", json={**body, "question": "Which drug was someone else given?"}),
               client.post("/v1/feedback", json={**body, "correction": {"start": 0, "end": 10_000}, "key": "other"}),
               client.post("/v1/feedback", json={**body, "note": "free text"}),
               httpx.post(client.base_url.join("/v1/feedback"), json=body)]
    assert [r.status_code for r in refused] == [403, 403, 422, 422, 401]
    assert "not one this service issued" in refused[0].json()["error"]
    with FeedbackStore(feedback_dir) as store:
        [record] = [r for r in store.records() if r.id == first.json()["feedback_id"]]
    assert record.passages[0].text == CONTEXT and record.question == OK["question"]
    assert record.passages[0].text[record.correction.start:record.correction.end] == "warfarin"
    assert record.model_version == answered.headers["x-model-version"] and record.token_id == hash_token(TOKEN)[:8]

    def audited():
        lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
        return [line for line in lines if line["route"] == "/v1/feedback" and line["status"] in (200, 201)] or None

    stored = wait_until(audited, timeout_s=20, what="the feedback's audit lines")
    assert {line.get("feedback_id") for line in stored} == {record.id} and stored[0]["verdict"] == "wrong"
    assert PATIENT not in audit_log.read_text()

    def rated():
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return [line for line in text.splitlines() if line.startswith("ray_qa_rated_answers_total{")
                and 'verdict="wrong"' in line and f'model_version="{record.model_version}"' in line] or None

    [line] = wait_until(rated, timeout_s=90, what="the rated-answers metric", interval_s=2)
    assert float(line.rsplit(" ", 1)[1]) == 1  # the retry is not counted again


def test_openapi_documents_every_status_and_bound(client):
    schema = client.get("/openapi.json").json()
    answer = schema["paths"]["/v1/answer"]["post"]
    assert {"200", "400", "401", "413", "422", "503", "500"} <= set(answer["responses"])
    for status in ("400", "401", "413", "422", "503", "500"):
        assert answer["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert "Retry-After" in answer["responses"]["503"]["headers"]
    assert schema["components"]["schemas"]["ErrorResponse"]["required"] == ["error"]
    assert answer["security"] == [{"bearer": []}]
    assert {"401", "200"} <= set(schema["paths"]["/v1/model"]["get"]["responses"])
    body = answer["requestBody"]["content"]["application/json"]["schema"]
    # A client generated from the schema sends nothing the validator rejects, and vice versa.
    for valid in (OK, [OK], [OK] * 64, {**OK, "top_k": 20, "max_answer_length": 512}):
        jsonschema.validate(valid, body)
    for invalid in ([], [OK] * 65, {**OK, "top_k": 21}, {**OK, "top_k": 0}, {**OK, "question": "x" * 1001},
                    {**OK, "context": "x" * 100_001}, {**OK, "question": "  "}, {**OK, "extra": 1}, {"question": "a"},
                    {**OK, "top_k": "3"}, {**OK, "max_answer_length": 513}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invalid, body)
        assert client.post("/v1/answer", json=invalid).status_code == 422


# --- fuzzing ------------------------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000", max_size=5)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
NOT_A_STRING = st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.text(), max_size=2) | st.just({})
NEAR_MISSES = st.one_of(
    st.sampled_from(["question", "context"]).map(lambda key: {k: v for k, v in OK.items() if k != key}),
    st.tuples(st.sampled_from(["question", "context"]), NOT_A_STRING | WHITESPACE).map(lambda kv: {**OK, kv[0]: kv[1]}),
    st.tuples(st.sampled_from(["top_k", "max_answer_length"]),
              st.integers(max_value=0) | st.integers(min_value=513) | st.text(max_size=3) | st.floats() | st.booleans()
              ).map(lambda kv: {**OK, kv[0]: kv[1]}),
    st.text(min_size=1, max_size=10).filter(lambda key: key not in OK and key not in ("top_k", "max_answer_length"))
    .map(lambda key: {**OK, key: 1}),
    st.integers(min_value=1001, max_value=3000).map(lambda n: {**OK, "question": "why " * (n // 4 + 1)}),
    st.just([]),
    st.integers(min_value=65, max_value=100).map(lambda n: [OK] * n),
    st.integers(min_value=0, max_value=3).map(lambda i: [OK] * i + [{**OK, "top_k": 0}]),
)


def _json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


BODIES = st.one_of(
    st.binary(max_size=300),
    ANY_JSON.map(_json),
    NEAR_MISSES.map(_json),
    # Any depth, up to far past Python's recursion limit.
    st.tuples(st.integers(1, 100_000), st.sampled_from([("[", "]", ""), ('{"a":', "}", "1")]))
    .map(lambda d: (d[1][0] * d[0] + d[1][2] + d[1][1] * d[0]).encode()),
    # Huge numbers: more digits than Python reads, or past every range.
    st.integers(1, 6000).map(lambda n: b'{"question": "a", "context": "b", "top_k": 9' + b"9" * n + b"}"),
    st.sampled_from([b'{"question": "a", "context": "b", "top_k": 1e999}', b'[1e-999, -0, NaN, -Infinity]']),
    # Unicode edge cases: unpaired surrogates, a byte-order mark, NUL, invalid UTF-8, overlong forms.
    st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\u0000\\ud800"]).map(
        lambda s: f'{{"question": "why{s}", "context": "x"}}'.encode()),
    st.sampled_from([b"\xef\xbb\xbf" + _json(OK), b"\xed\xa0\x80", b"\xc0\xaf", b'{"question": "\xff"}', b"\x00"]),
)


def test_fuzzed_bodies_all_get_a_json_4xx_and_the_service_keeps_answering(client):
    sent = []

    @settings(max_examples=550, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(BODIES)
    def post(body):
        response = client.post("/v1/answer", content=body, headers={"content-type": "application/json"})
        sent.append(response.status_code)
        assert 400 <= response.status_code < 500, (body[:200], response.status_code, response.text[:300])
        assert isinstance(response.json()["error"], str)

    post()
    assert len(sent) >= 500
    assert client.post("/v1/answer", json=OK).status_code == 200
    assert replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {"RUNNING": 1}


# --- failover, then the logs --------------------------------------------------------------------


def test_killing_the_model_replica_under_load_loses_no_request(service, client, metrics_port):
    import ray

    # Questions that keep the replica busy, so that some are in flight when it dies.
    busy_request = [{**OK, "context": " ".join([CONTEXT] * 8)}] * 4

    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#QAModel#" in a["name"]
                 and a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]
    statuses, stop = [], threading.Event()

    def ask_until_stopped():
        with httpx.Client(base_url=service, timeout=60, headers=AUTH) as own:
            while not stop.is_set():
                statuses.append(own.post("/v1/answer", json=busy_request).status_code)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(ask_until_stopped) for _ in range(8)]
        wait_until(lambda: len(statuses) >= 20, timeout_s=60, what="requests before the kill", interval_s=0.1)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        answered_at_kill = len(statuses)
        wait_until(lambda: len(statuses) >= answered_at_kill + 40, timeout_s=240, what="answers from a new replica",
                   interval_s=0.2)
        stop.set()
        for worker in workers:
            worker.result()
    # No 500: the questions on the dead replica were asked again. (A 503 with Retry-After is allowed:
    # on a starved machine the restart can outlast a request's deadline.)
    counts = {s: statuses.count(s) for s in set(statuses)}
    assert set(counts) <= {200, 503} and counts.get(200, 0) > answered_at_kill, counts
    # And it was the retry that saved them: no request was turned away because its replica died
    # (Ray exports the counters every second; a reason appears once counted).
    time.sleep(3)
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    lost = [line for line in metrics.splitlines()
            if line.startswith("ray_qa_rejections_total{") and 'reason="replica_lost"' in line]
    assert all(float(line.rsplit(" ", 1)[1]) == 0 for line in lost), lost
    [new_replica] = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#QAModel#" in a["name"]
                     and a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]
    assert new_replica["name"] != replica["name"]


def test_a_client_request_id_comes_back_in_the_response_and_only_its_hash_is_logged(service, client, audit_log):
    import ray

    from pathlib import Path

    from serve_app.request_ids import client_id_hash

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def logged(text: str) -> list[str]:
        files = [path for path in logs.rglob("*") if path.is_file()] + [audit_log]
        return [str(path) for path in files if text.encode() in path.read_bytes()]

    # Letters, digits and dashes only, and still a patient: no pattern makes a client's id safe to log.
    for client_id in ("Smith_John_1962-03-04_MRN4471902", f"PATIENT {PATIENT} MRN 4417-2231 ward 7"):
        response = client.post("/v1/answer", json=OK, headers={"X-Request-Id": client_id})
        assert response.status_code == 200
        minted = response.headers["x-request-id"]
        assert minted != client_id and "4471902" not in minted and "4417" not in minted
        echoed = response.headers.get("x-client-request-id")
        assert echoed == (client_id if " " not in client_id else None)  # printable ASCII without spaces only
        wait_until(lambda: logged(minted), timeout_s=30, what="the minted request id in the logs")
        line = next(json.loads(line) for line in audit_log.read_text().splitlines() if minted in line)
        assert line["request_id"] == minted and line["client_request_id_hash"] == client_id_hash(client_id)
    time.sleep(1)
    assert logged("MRN4471902") == logged("MRN 4417-2231") == []


def test_error_bodies_name_no_text_the_client_made_up(client):
    keys = client.post("/v1/answer", json={**OK, f"{PATIENT} Smith": 1, "note_for_dr": 2})
    assert keys.status_code == 422 and PATIENT not in keys.text and "note_for_dr: unknown field" in keys.text
    path = client.get(f"/v1/{PATIENT}%20Smith")
    assert path.status_code == 404 and PATIENT not in path.text and "/docs" in path.json()["error"]
    assert "'/v1/nothing'" in client.get("/v1/nothing").json()["error"]


def test_no_log_holds_patient_text(service, client, audit_log):
    import ray

    from pathlib import Path

    # Its own patient, in every place a request carries text: answered, refused and failed requests alike.
    patient = "Zyxwvutsr"
    context = f"{patient} was admitted with chest pain and given aspirin."
    sent = [client.post("/v1/answer", json={"question": f"What was {patient} given?", "context": context}),
            client.post("/v1/answer", json=[{"question": f"Why was {patient} admitted?", "context": context}] * 2),
            client.post("/v1/answer", json={"question": f"{patient}?", "context": context, "top_k": 99}),
            client.post("/v1/answer", json={"question": f"{patient}?", "context": context * 200}),
            client.post("/v1/answer", content=f'{{"question": "{patient}", "context": '.encode()),
            client.post("/v1/ask", json={"question": f"What was {patient} given?"})]
    assert [r.status_code for r in sent] == [200, 200, 422, 413, 400, 404]
    rating = {"response_id": sent[0].headers["x-response-id"], "question": f"What was {patient} given?",
              "context": context, "verdict": "wrong", "correction": {"start": 0, "end": len(patient)}, "key": patient}
    sent += [client.post("/v1/feedback", json=rating),
             client.post("/v1/feedback", json={**rating, "question": f"{patient} again?", "key": "other"})]
    assert [r.status_code for r in sent[-2:]] == [201, 403]
    assert sent[0].json()["answer"]  # the service read the text
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    time.sleep(2)  # log lines reach their files asynchronously
    files = [path for path in logs.rglob("*") if path.is_file()] + [audit_log]
    assert len(files) > 5 and audit_log.read_text().count("\n") >= len(sent)
    leaking = [str(path) for path in files if patient.lower().encode() in path.read_bytes().lower()]
    assert leaking == []
