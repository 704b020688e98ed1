"""The packaged Serve config made small for the tests (tiny model, half a CPU)."""

from __future__ import annotations

from pathlib import Path

from serve_app.app import MODEL_DEPLOYMENT, load_serve_config

# Short windows so the fixture contexts span several overlapping windows (as `small_config`).
SMALL_QA = {"max_length": 48, "stride": 16, "max_question_length": 20}


def service_config(model_dir: Path, port: int, *, qa: dict | None = None, **args) -> dict:
    """The packaged Serve config, made small: one model replica on half a CPU, the model at ``model_dir``.

    ``qa`` overrides the model's QA settings (default: ``SMALL_QA``; ``{}`` serves the model's own).
    """
    config = load_serve_config()
    config["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 60}
    [app] = config["applications"]
    app["args"] = {**app["args"], "model": str(model_dir), "qa": SMALL_QA if qa is None else qa, **args}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {**deployment["ray_actor_options"], "num_cpus": 0.1}
        if deployment["name"] == MODEL_DEPLOYMENT:
            deployment["ray_actor_options"]["num_cpus"] = 0.5
            deployment["autoscaling_config"] = {**deployment["autoscaling_config"], "max_replicas": 1}
    return config
