"""Updating the model of a running service (python -m serve_app update): gated, under load, and back.

One application for the module on the session's Ray + Serve, serving tiny model A with the packaged
autoscaling (and a one-second idle time before the last replica stops); model B is another tiny
model. In order: refused updates change nothing; the idle model scales to zero, and neither the
page, its description nor an update at zero loads it until a request (then B, as the gate saw it,
answers); clients keep asking while the service goes back to A (with the token file gone from the
updating shell: the service keeps its tokens) and rolls back to B: every response must be a 200
naming one of the two, and once the command returns only the new model may answer; last, an update
told to take other tokens takes them.
"""

import collections
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import FIXTURES, build_tiny_model
from serve_helpers import AUTH, TOKEN, service_config, serving

from bench.local_service import free_port, replica_counts, wait_until
from serve_app.app import APP_NAME, INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT
from serve_app.app import deployment_options, load_serve_config
from serve_app.update import main as update
from serve_app.update import application_options, rollout_options, surge_fits

QUESTION = {"question": "What do staff clean?", "context": "Staff clean their hands with an alcohol-based rub."}


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("b") / "model", seed=1)


def packaged_options() -> dict[str, dict]:
    return deployment_options(load_serve_config()["applications"][0])


def test_a_rollout_starts_the_model_at_the_replicas_running_now_within_its_bounds():
    options = packaged_options()
    scaling = options[MODEL_DEPLOYMENT]["autoscaling_config"]
    for running, expected in ((0, scaling["min_replicas"]), (1, 1), (99, scaling["max_replicas"])):
        rollout = rollout_options(options, {MODEL_DEPLOYMENT: running}, surge=True)
        assert rollout[MODEL_DEPLOYMENT]["autoscaling_config"]["initial_replicas"] == expected
        assert rollout[MODEL_DEPLOYMENT]["max_surge_percent"] == options[MODEL_DEPLOYMENT]["max_surge_percent"] > 0
    assert scaling["min_replicas"] == 0  # so a service at zero stays at zero
    without = rollout_options(options, {MODEL_DEPLOYMENT: 1}, surge=False)
    assert all(entry["max_surge_percent"] == 0 for entry in without.values())
    assert options == packaged_options()  # the options given are not changed


def test_a_surge_fits_only_where_the_new_replicas_find_free_resources():
    options = {MODEL_DEPLOYMENT: {"max_surge_percent": 50, "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}},
               "QAIngress": {"max_surge_percent": 100}}
    running = {MODEL_DEPLOYMENT: 3, "QAIngress": 1}  # 50 % of 3 rounds up to 2 new model replicas
    assert surge_fits(options, running, {"CPU": 5, "GPU": 2}) == (True, "")
    fits, short = surge_fits(options, running, {"CPU": 4.5, "GPU": 1})
    assert not fits and short == "5 CPUs (free: 4.5), 2 GPUs (free: 1)"
    assert surge_fits(options, {MODEL_DEPLOYMENT: 0, "QAIngress": 1}, {"CPU": 1}) == (True, "")


def test_with_a_library_the_retrievers_replicas_count_and_keep_their_number():
    from serve_app.retriever import RETRIEVER_DEPLOYMENT

    [application] = load_serve_config()["applications"]
    application["args"]["library"] = "/srv/library"
    options = application_options(application)
    assert options[RETRIEVER_DEPLOYMENT]["max_surge_percent"] == 50
    # Two CPUs, all held by one model and one retriever replica: no room for either's surge.
    running = {MODEL_DEPLOYMENT: 1, RETRIEVER_DEPLOYMENT: 1, "QAIngress": 1}
    fits, short = surge_fits(options, running, {"CPU": 0})
    assert not fits and short.startswith("2 CPUs")
    rollout = rollout_options(options, {**running, RETRIEVER_DEPLOYMENT: 0}, surge=fits)
    assert {entry["max_surge_percent"] for entry in rollout.values()} == {0}
    assert rollout[RETRIEVER_DEPLOYMENT]["autoscaling_config"]["initial_replicas"] == 0  # at zero: stays there


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    # The packaged autoscaling, with a short idle time before the last replica stops (a flag users set).
    # A replica woken from zero while the other test worker trains can take longer than the packaged
    # 30 s deadline to load: these tests are about which model answers, not about the deadline.
    config = service_config(tiny_model_dir, free_port(), request_deadline_s=55)
    [model] = [d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_DEPLOYMENT]
    model["autoscaling_config"].update(downscale_to_zero_delay_s=1, downscale_delay_s=1)
    with serving(config) as url:
        import ray

        yield url, ray.get_runtime_context().gcs_address


def card(url: str, token: str = TOKEN) -> dict:
    return httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {token}"}).json()


def under_load(url: str, action, *, clients: int = 4) -> tuple[list, float]:
    """``(responses, when action returned)`` of clients asking all along ``action()``: (time sent, status,
    version). A request sent before ``action()`` returned may be answered by the old model after it."""
    responses, stop = [], threading.Event()

    def ask():
        with httpx.Client(timeout=60, headers=AUTH) as client:
            while not stop.is_set():
                sent = time.monotonic()
                response = client.post(f"{url}/v1/answer", json=QUESTION)
                responses.append((sent, response.status_code, response.headers.get("x-model-version")))

    threads = [threading.Thread(target=ask) for _ in range(clients)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(responses) >= 2 * clients, timeout_s=60, what="answers before the update")
    assert action() == 0
    returned = time.monotonic()
    wait_until(lambda: sum(1 for sent, _, _ in list(responses) if sent > returned) >= clients, timeout_s=60,
               what="answers to requests sent after it returned")
    stop.set()
    for thread in threads:
        thread.join()
    return responses, returned


def test_a_refused_update_changes_nothing_and_says_why(service, tmp_path, model_b, capsys):
    url, address = service
    version = card(url)["version"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")  # no weights, no tokenizer
    result = subprocess.run([sys.executable, "-m", "serve_app", "update", "--model", str(broken), "--address", address],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "does not load" in result.stderr and "nothing was changed" in result.stderr

    # A model below --min-f1 on a validation file (the tiny models answer at random).
    assert update(["--model", str(model_b), "--validate-on", str(FIXTURES / "tiny-squad.json"),
                   "--min-f1", "99"]) == 2
    # Not better than the serving model on the clinicians' questions (no model gains 101 points).
    capsys.readouterr()
    assert update(["--model", str(model_b), "--improve-on", str(FIXTURES / "tiny-squad.json"),
                   "--min-gain", "101"]) == 2
    assert "not more than --min-gain 101 above the serving model's" in capsys.readouterr().err
    assert update(["--rollback"]) == 2  # never updated: nothing to roll back to
    after = card(url)
    assert after["version"] == version and after["previous"] is None


def test_updating_a_service_at_zero_loads_nothing_until_a_request(service, model_b):
    url, _ = service
    a = card(url)["version"]
    wait_until(lambda: replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {}, timeout_s=120, what="the model at zero")
    assert replica_counts(APP_NAME, INGRESS_DEPLOYMENT) == {"RUNNING": 1}
    # Neither the page, the model's description nor an update wakes the model.
    assert httpx.get(f"{url}/").status_code == 200 and card(url)["version"] == a
    assert update(["--model", str(model_b)]) == 0
    time.sleep(2)
    assert replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {}
    gated = card(url)["version"]
    # Training writes model B's directory again before any replica has loaded it: the replica that
    # starts now still loads the model the gate checked, the one /v1/model names.
    build_tiny_model(model_b, seed=7)
    response = httpx.post(f"{url}/v1/answer", json=QUESTION, headers=AUTH, timeout=90)
    assert response.status_code == 200 and response.headers["x-model-version"] == card(url)["version"] == gated != a
    assert card(url)["previous"]["version"] == a
    assert update(["--model", str(model_b)]) == 0  # the new files are another model: a new version
    assert card(url)["version"] not in (gated, a)
    assert update(["--rollback"]) == 0 and card(url)["version"] == gated


def test_update_and_rollback_under_load_drop_no_request_and_keep_the_services_tokens(service, tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from serve_helpers import token_hashes_file

    from serve_app.auth import TOKEN_HASHES_ENV, hash_token

    url, _ = service
    b, b_name = card(url)["version"], card(url)["name"]
    # The file the service read its tokens from is gone from the updating shell, and its environment
    # names another token: the service keeps the token it accepted (the clients send it all along).
    hashes = token_hashes_file(tiny_model_dir.parent)  # the file service_config gave the service
    monkeypatch.setenv(TOKEN_HASHES_ENV, hash_token("a-token-of-this-shell"))
    moved = hashes.rename(tmp_path / "elsewhere.txt")
    try:
        responses, returned = under_load(url, lambda: update(["--model", str(tiny_model_dir)]))
    finally:
        moved.rename(hashes)
    a = card(url)["version"]
    assert a != b and card(url)["previous"] == {"name": b_name, "version": b}
    assert collections.Counter(status for _, status, _ in responses) == {200: len(responses)}
    assert {version for _, _, version in responses} == {a, b}
    assert {version for when, _, version in responses if when > returned} == {a}
    assert ask(url, "a-token-of-this-shell") == 401 and httpx.post(f"{url}/v1/answer", json=QUESTION).status_code == 401

    responses, returned = under_load(url, lambda: update(["--rollback"]))
    assert card(url)["version"] == b and card(url)["previous"]["version"] == a
    assert collections.Counter(status for _, status, _ in responses) == {200: len(responses)}
    assert {version for when, _, version in responses if when > returned} == {b}


def ask(url: str, token: str) -> int:
    return httpx.post(f"{url}/v1/answer", json=QUESTION, timeout=90, headers={"Authorization": f"Bearer {token}"}
                      ).status_code


def test_an_update_changes_the_services_tokens_when_told(service, tmp_path):
    from serve_helpers import TOKEN

    from serve_app.auth import hash_token

    url, _ = service
    before = card(url)["version"]
    new_hashes = tmp_path / "new-token-hashes.txt"
    new_hashes.write_text(hash_token("the-new-token") + "\n")
    assert update(["--rollback", "--token-hashes-file", str(new_hashes)]) == 0
    assert card(url, "the-new-token")["version"] != before
    assert ask(url, "the-new-token") == 200 and ask(url, TOKEN) == 401
