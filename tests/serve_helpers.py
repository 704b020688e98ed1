"""The packaged Serve config made small for the tests (tiny model, half a CPU, a test token)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from serve_app.app import MODEL_DEPLOYMENT, load_serve_config

# Short windows so the fixture contexts span several overlapping windows (as `small_config`).
SMALL_QA = {"max_length": 48, "stride": 16, "max_question_length": 20}
# The API token the test services accept (they are given only its hash).
TOKEN = "test-token-not-a-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def token_hashes_file(directory: Path) -> Path:
    """A token hashes file in ``directory`` that accepts :data:`TOKEN`."""
    from serve_app.auth import hash_token

    path = directory / "api-token-hashes.txt"
    path.write_text(f"# the test token\n{hash_token(TOKEN)}\n", encoding="utf-8")
    return path


def service_config(model_dir: Path, port: int, *, qa: dict | None = None, **args) -> dict:
    """The packaged Serve config, made small: one model replica on half a CPU, the model at ``model_dir``.

    ``qa`` overrides the model's QA settings (default: ``SMALL_QA``; ``{}`` serves the model's own).
    The service accepts :data:`TOKEN`.
    """
    config = load_serve_config()
    config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 60}
    [app] = config["applications"]
    hashes = str(token_hashes_file(model_dir.parent))
    app["args"] = {**app["args"], "model": str(model_dir), "qa": SMALL_QA if qa is None else qa,
                   "token_hashes_file": hashes, **args}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "num_cpus": 0.1}
        if deployment["name"] == MODEL_DEPLOYMENT:
            deployment["ray_actor_options"]["num_cpus"] = 0.5
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"], "max_replicas": 1}
    return config


@contextmanager
def serving(config: dict):
    """``config``'s application deployed on the session's Ray and Serve (started if need be); yields its
    URL and deletes the application afterwards. Serve listens where its first application asked."""
    from bench.local_service import serving as deployed
    from conftest import shared_ray

    shared_ray()
    with deployed(config) as url:
        yield url
