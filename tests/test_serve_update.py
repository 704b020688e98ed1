"""Updating the model of a running service (python -m serve_app update): gated, under load, and back.

One Ray + Serve for the module, serving tiny model A and starting at zero replicas; model B is
another tiny model. In order: refused updates change nothing; an update at zero loads nothing until
a request (then B answers); clients keep asking while the service goes back to A and rolls back to
B: every response must be a 200 naming one of the two, and once the command returns only the new
model may answer.
"""

import collections
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import FIXTURES, build_tiny_model
from serve_helpers import AUTH, service_config

from bench.local_service import free_port, local_serve, replica_counts, wait_until
from serve_app.app import MODEL_DEPLOYMENT
from serve_app.update import main as update

QUESTION = {"question": "What do staff clean?", "context": "Staff clean their hands with an alcohol-based rub."}


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("b") / "model", seed=1)


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    config = service_config(tiny_model_dir, free_port())
    [model] = [d for d in config["applications"][0]["deployments"] if d["name"] == MODEL_DEPLOYMENT]
    model["autoscaling_config"].update(initial_replicas=0)  # at zero from the start
    with local_serve(config) as url:
        import ray

        yield url, ray.get_runtime_context().gcs_address


def card(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", headers=AUTH).json()


def under_load(url: str, action, *, clients: int = 4) -> tuple[list, float]:
    """``(responses, when action returned)`` of clients asking all along ``action()``: (time, status, version)."""
    responses, stop = [], threading.Event()

    def ask():
        with httpx.Client(timeout=60, headers=AUTH) as client:
            while not stop.is_set():
                response = client.post(f"{url}/v1/answer", json=QUESTION)
                responses.append((time.monotonic(), response.status_code, response.headers.get("x-model-version")))

    threads = [threading.Thread(target=ask) for _ in range(clients)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(responses) >= 2 * clients, timeout_s=60, what="answers before the update")
    assert action() == 0
    returned = time.monotonic()
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join()
    return responses, returned


def test_a_refused_update_changes_nothing_and_says_why(service, tmp_path, model_b):
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
    assert update(["--rollback"]) == 2  # never updated: nothing to roll back to
    after = card(url)
    assert after["version"] == version and after["previous"] is None


def test_updating_a_service_at_zero_loads_nothing_until_a_request(service, model_b):
    url, _ = service
    a = card(url)["version"]
    assert replica_counts("qa", MODEL_DEPLOYMENT) == {}
    assert update(["--model", str(model_b)]) == 0
    time.sleep(1)
    assert replica_counts("qa", MODEL_DEPLOYMENT) == {}
    response = httpx.post(f"{url}/v1/answer", json=QUESTION, headers=AUTH, timeout=90)
    assert response.status_code == 200 and response.headers["x-model-version"] == card(url)["version"] != a
    assert card(url)["previous"]["version"] == a


def test_update_and_rollback_under_load_drop_no_request(service, tiny_model_dir):
    url, _ = service
    b, b_name = card(url)["version"], card(url)["name"]
    responses, returned = under_load(url, lambda: update(["--model", str(tiny_model_dir)]))
    a = card(url)["version"]
    assert a != b and card(url)["previous"] == {"name": b_name, "version": b}
    assert collections.Counter(status for _, status, _ in responses) == {200: len(responses)}
    assert {version for _, _, version in responses} == {a, b}
    assert {version for when, _, version in responses if when > returned} == {a}

    responses, returned = under_load(url, lambda: update(["--rollback"]))
    assert card(url)["version"] == b and card(url)["previous"]["version"] == a
    assert collections.Counter(status for _, status, _ in responses) == {200: len(responses)}
    assert {version for when, _, version in responses if when > returned} == {b}
