"""The cluster configs of cluster/ parse and validate; no Kubernetes or cloud account needed.

- KubeRay manifests (RayJob for train, tune and predict, RayService for serve_app): the key structure of
  the ray.io/v1 CRDs, checked with JSON schemas (cluster_files.py); parameters are envsubst placeholders;
  the job entry points parse with our own command-line parsers.
- The RayService's serveConfigV2 validates with Ray Serve's own schema and carries the same
  applications, args and autoscaling (scale to zero) as serve_app/config.yaml.
- Every node the cluster launcher starts runs Serve's proxy with the request-id filter (the launcher's
  own schema: test_cluster_launcher.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex

import jsonschema
import pytest
import yaml

from cluster_files import (CLUSTER, KUBERAY, PARAMETERS, PLACEHOLDER, RAY_JOB, RAY_SERVICE, SERVE_CONFIG,
                           SERVE_CONFIG_KEYS, envsubst, installed_ray_version, load_launcher_config, load_manifest,
                           validate_with_ray_serve)
from serve_app.settings import ServeArgs

RAY_JOBS = ["rayjob-train.yaml", "rayjob-tune.yaml", "rayjob-predict.yaml"]
ALL_MANIFESTS = [*RAY_JOBS, "rayservice.yaml"]


# --- every manifest --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_MANIFESTS)
def test_parameters_are_the_documented_envsubst_placeholders(name):
    raw = (KUBERAY / name).read_text(encoding="utf-8")
    used = set(PLACEHOLDER.findall(raw))
    assert used, f"{name} has no parameters; image and model location must not be hard-coded"
    assert used <= set(PARAMETERS), f"{name}: undocumented placeholders {sorted(used - set(PARAMETERS))}"
    assert {"IMAGE", "MODEL"} <= used
    # The envsubst command shown in the manifest's header substitutes exactly what it uses.
    [shown] = re.findall(r"envsubst '([^']*)' < cluster/kuberay/" + re.escape(name), raw)
    assert set(PLACEHOLDER.findall(shown)) == used
    # ...and cluster/README.md documents every parameter.
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    for parameter in used:
        assert f"`{parameter}`" in readme, f"cluster/README.md does not describe {parameter}"
    # After substitution nothing shell-like is left for kubectl to choke on.
    assert "$" not in envsubst(raw, PARAMETERS).split("\napiVersion:", 1)[1]


@pytest.mark.parametrize("name", ALL_MANIFESTS)
def test_every_pod_runs_the_image_parameter_with_a_matching_ray_version(name):
    manifest = load_manifest(name)
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    # The client (pyproject pins it) and the cluster must run the same Ray.
    assert cluster["rayVersion"] == installed_ray_version()
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == PARAMETERS["IMAGE"]
        mounts = {m["name"]: m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        assert set(mounts) <= set(volumes), "a volumeMount without its volume"
        assert mounts.get("shared") == "/mnt/shared"
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == PARAMETERS["SHARED_PVC"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert len({g["groupName"] for g in cluster["workerGroupSpecs"]}) == len(cluster["workerGroupSpecs"])


# --- RayJob: train and tune ------------------------------------------------------------------------

@pytest.mark.parametrize("name", RAY_JOBS)
def test_rayjob_has_the_kuberay_structure(name):
    manifest = load_manifest(name)
    jsonschema.validate(manifest, RAY_JOB)
    assert isinstance(yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]), dict)


def _train_parser() -> argparse.ArgumentParser:
    from train_job.config import add_config_flags

    parser = argparse.ArgumentParser(prog="python -m train_job", exit_on_error=False)
    add_config_flags(parser)
    return parser


@pytest.mark.parametrize("name, module", [("rayjob-train.yaml", "train_job"), ("rayjob-tune.yaml", "train_job.tune")])
def test_rayjob_entrypoint_parses_with_our_own_flags(name, module, monkeypatch):
    from train_job.config import config_from_args

    manifest = load_manifest(name)
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", module]
    flags = argv[3:]
    if module == "train_job":
        config = config_from_args(_train_parser().parse_args(flags))
    else:
        import train_job.tune as tune_module

        seen = {}
        monkeypatch.setattr(tune_module, "search", lambda config, args: seen.update(config=config, args=args))
        assert tune_module.main(flags) == 0
        config = seen["config"]
        assert seen["args"].max_concurrent_trials * config.num_workers <= _gpus(manifest)
    assert config.model == PARAMETERS["MODEL"]
    assert config.storage_path == PARAMETERS["STORAGE_PATH"]
    assert config.output_dir.startswith("/mnt/shared/"), "outputs must outlive the cluster: the shared volume"
    assert config.use_gpu
    # Every Ray Train worker finds a GPU and its CPUs on a worker pod.
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= config.cpus_per_worker
               for g in groups)
    if module == "train_job":
        assert config.num_workers <= _gpus(manifest)


def test_predict_rayjob_entrypoint_parses_with_our_own_flags():
    from train_job.predict import parse_args

    manifest = load_manifest("rayjob-predict.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "train_job.predict"]
    args = parse_args(argv[3:])
    assert args.model == PARAMETERS["MODEL"]
    assert args.data == [PARAMETERS["DATA"]], "the glob reaches train_job.predict unexpanded (quoted)"
    assert args.output.startswith("/mnt/shared/"), "outputs must outlive the cluster: the shared volume"
    # One actor per GPU, and each finds its CPUs on a GPU pod.
    assert args.num_gpus_per_actor > 0
    assert args.concurrency * args.num_gpus_per_actor <= _gpus(manifest)
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) >= args.cpus_per_actor
               for g in groups)


def _gpus(manifest: dict) -> int:
    """GPUs of the RayJob's cluster at its fixed size."""
    total = 0
    for group in manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    return total


# --- RayService ------------------------------------------------------------------------------------

def serve_config_v2() -> dict:
    return yaml.safe_load(load_manifest("rayservice.yaml")["spec"]["serveConfigV2"])


def test_rayservice_has_the_kuberay_structure_and_a_valid_serve_config():
    jsonschema.validate(load_manifest("rayservice.yaml"), RAY_SERVICE)
    config = serve_config_v2()
    jsonschema.validate(config, SERVE_CONFIG_KEYS)
    validate_with_ray_serve(config)
    # On Kubernetes the proxy must accept traffic from the Serve service, not only from the pod itself.
    assert config["http_options"]["host"] == "0.0.0.0"
    assert config["http_options"]["port"] == 8000
    [app] = config["applications"]
    assert app["args"]["model"] == PARAMETERS["MODEL"]


def test_rayservice_scales_the_model_and_its_gpu_pods_to_zero():
    manifest = load_manifest("rayservice.yaml")
    [app] = serve_config_v2()["applications"]
    model = next(d for d in app["deployments"] if d["name"] == "QAModel")
    autoscaling = model["autoscaling_config"]
    from ray.serve.config import AutoscalingConfig

    # Ray ignores unknown autoscaling keys: a typo would silently fall back to a default.
    known = set(getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__)
    assert set(autoscaling) <= known, f"unknown autoscaling_config keys {sorted(set(autoscaling) - known)}"
    AutoscalingConfig(**autoscaling)
    assert autoscaling["min_replicas"] == 0
    assert autoscaling["downscale_to_zero_delay_s"] > 0
    # The node level follows: the autoscaler removes GPU pods with no replica and adds them back.
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpus_per_replica = model["ray_actor_options"]["num_gpus"]
    assert gpus_per_replica > 0
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups)
    gpu_capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                       for g in gpu_groups)
    assert gpu_capacity >= autoscaling["max_replicas"] * gpus_per_replica


def test_rayservice_model_update_rolls_in_place_with_room_for_the_surge():
    """cluster/README.md's update path (KubeRay v1.5.1): serveConfigV2 rolls in place with Serve's
    surge, which needs GPU pods for the extra replicas; a cluster change is a NewCluster upgrade."""
    import math

    manifest = load_manifest("rayservice.yaml")
    assert manifest["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert "v1.5.1 or later" in (KUBERAY / "rayservice.yaml").read_text(encoding="utf-8")
    assert "v1.5.1 or later" in (CLUSTER / "README.md").read_text(encoding="utf-8")
    [app] = serve_config_v2()["applications"]
    model = next(d for d in app["deployments"] if d["name"] == "QAModel")
    ingress = next(d for d in app["deployments"] if d["name"] == "QAIngress")
    most = model["autoscaling_config"]["max_replicas"]
    assert model["max_surge_percent"] > 0 and ingress["max_surge_percent"] > 0
    surge = math.ceil(model["max_surge_percent"] * most / 100)
    [gpu_group] = [g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu_group["maxReplicas"] >= most + surge  # one replica (one GPU) per pod


def test_rayservice_carries_the_serve_app_config():
    """Same application, args and deployment settings as serve_app/config.yaml. Only the cluster
    specifics may differ: the model location, the HTTP host and the replicas' GPUs."""
    local = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    remote = serve_config_v2()
    assert remote["http_options"].get("request_timeout_s") == local["http_options"].get("request_timeout_s")
    assert remote["http_options"]["port"] == local["http_options"].get("port", 8000)
    [local_app], [remote_app] = local["applications"], remote["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert remote_app.get(key) == local_app.get(key), key
    local_args = {k: v for k, v in local_app.get("args", {}).items() if k != "model"}
    remote_args = {k: v for k, v in remote_app["args"].items() if k not in ("model", "feedback")}
    assert remote_args == local_args
    local_deployments = {d["name"]: d for d in local_app.get("deployments", [])}
    # The feedback keeper's entry is the cluster's own: it pins the store's writer to its volume.
    remote_deployments = {d["name"]: d for d in remote_app["deployments"] if d["name"] != "FeedbackKeeper"}
    assert set(remote_deployments) == set(local_deployments)
    for name, local_deployment in local_deployments.items():
        remote_deployment = copy.deepcopy(remote_deployments[name])
        local_deployment = copy.deepcopy(local_deployment)
        # Config files replace ray_actor_options whole: the cluster's may add GPUs, nothing else.
        remote_actor = remote_deployment.pop("ray_actor_options", {})
        local_actor = local_deployment.pop("ray_actor_options", {})
        assert {k: v for k, v in remote_actor.items() if k != "num_gpus"} == \
               {k: v for k, v in local_actor.items() if k != "num_gpus"}, name
        assert remote_deployment == local_deployment, f"{name}: autoscaling/replica settings differ"


def test_rayservice_keeps_feedback_on_the_head_that_mounts_its_volume():
    from serve_app.feedback.keeper import FEEDBACK_DEPLOYMENT
    from serve_app.feedback.receipts import KEY_ENV

    manifest = load_manifest("rayservice.yaml")
    [app] = serve_config_v2()["applications"]
    [keeper] = [d for d in app["deployments"] if d["name"] == FEEDBACK_DEPLOYMENT]
    [resource] = keeper["ray_actor_options"]["resources"]
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert resource in json.loads(yaml.safe_load(head["rayStartParams"]["resources"]))  # only the head has it
    assert all(resource not in str(group["rayStartParams"]) for group in cluster["workerGroupSpecs"])
    [container] = head["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["feedback"] == app["args"]["feedback"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in head["template"]["spec"]["volumes"]}
    assert claims["feedback"] == PARAMETERS["FEEDBACK_PVC"]
    for spec in [head["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]:
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env[KEY_ENV]["valueFrom"]["secretKeyRef"]["name"] == "qa-serve-feedback-key"


# --- security: API tokens, Ray's token authentication, the NetworkPolicy ----------------------------

def _containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ALL_MANIFESTS)
def test_ray_token_authentication_guards_the_dashboard_and_jobs_api(name):
    spec = load_manifest(name)["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    # KubeRay's authOptions needs Ray 2.52 or later.
    assert tuple(int(part) for part in cluster["rayVersion"].split(".")) >= (2, 52, 0)


def test_rayservice_reads_the_api_token_hashes_from_a_secret():
    """Every pod (wherever the application builder runs) gets $QA_TOKEN_HASHES from the Secret, never a literal."""
    from serve_app.auth import TOKEN_HASHES_ENV

    cluster = load_manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    for container in _containers(cluster):
        [variable] = [e for e in container.get("env", []) if e["name"] == TOKEN_HASHES_ENV]
        assert "value" not in variable
        assert variable["valueFrom"]["secretKeyRef"] == {"name": "qa-serve-api-tokens", "key": "token-hashes"}
    [app] = serve_config_v2()["applications"]
    assert not app["args"].get("insecure_no_auth")
    # The README's command creates that Secret.
    text = (KUBERAY / "rayservice.yaml").read_text(encoding="utf-8")
    assert "kubectl create secret generic qa-serve-api-tokens --from-file=token-hashes=" in text


def test_rayservice_sheds_load_with_503_and_retry_after():
    [app] = serve_config_v2()["applications"]
    for deployment in app["deployments"]:
        assert deployment["max_queued_requests"] > 0, deployment["name"]
    ingress = next(d for d in app["deployments"] if d["name"] == "QAIngress")
    assert ingress["backpressure_config"]["retry_after_s"] >= 1
    deadline = app["args"].get("request_deadline_s", ServeArgs.model_fields["request_deadline_s"].default)
    assert deadline < yaml.safe_load(load_manifest("rayservice.yaml")["spec"]["serveConfigV2"])["http_options"][
        "request_timeout_s"]


def test_networkpolicy_opens_only_serve_to_others():
    [policy] = list(yaml.safe_load_all((KUBERAY / "networkpolicy.yaml").read_text(encoding="utf-8")))
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # It selects every pod of the RayService's cluster.
    selected = policy["spec"]["podSelector"]["matchLabels"]
    cluster = load_manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert selected.items() <= group["template"]["metadata"]["labels"].items()
    ray_ports = {6379, 8265, 10001}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from", [])
        if not sources:  # open to anyone: the Serve port only
            assert ports == {8000}, rule
        elif not ports:  # every port: the cluster's own pods only
            assert sources == [{"podSelector": {"matchLabels": selected}}], rule
        else:  # the operator: the dashboard API only
            assert ports == {8265} and all("kuberay-operator" in json.dumps(s) for s in sources), rule
    open_to_all = {p["port"] for r in policy["spec"]["ingress"] if not r.get("from") for p in r["ports"]}
    assert not open_to_all & ray_ports


def test_every_cluster_node_starts_its_serve_proxy_with_the_request_id_filter():
    from serve_app.request_ids import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    cluster = load_manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK, container["name"]
    setting = f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK}"
    assert f"--env {setting}" in load_launcher_config()["docker"]["run_options"]
    assert f"ENV {setting}" in (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    assert setting in (CLUSTER / "local-cluster.sh").read_text(encoding="utf-8")
