"""What the cluster/ tests share: the files' paths, the manifests' parameters and envsubst, JSON schemas
of the parts of the KubeRay CRDs (ray.io/v1) and Serve config we rely on, and Ray Serve's own schema."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = ROOT / "serve_app" / "config.yaml"

# The parameters of the manifests, with example values (what cluster/README.md exports).
PARAMETERS = {
    "IMAGE": "registry.example.com/ray-extractive-qa:0.1.0",
    "MODEL": "bert-base-cased",
    "SHARED_PVC": "qa-shared",
    "FEEDBACK_PVC": "qa-feedback",
    "STORAGE_PATH": "s3://my-bucket/qa/checkpoints",
    "DATA": "/mnt/shared/data/questions/*.jsonl",
}
PLACEHOLDER = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
DNS_1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def envsubst(text: str, values: dict[str, str]) -> str:
    """What `envsubst '$IMAGE $MODEL ...'` does: replace $NAME and ${NAME} for the listed names only."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def load_manifest(name: str, **overrides) -> dict:
    text = envsubst((KUBERAY / name).read_text(encoding="utf-8"), {**PARAMETERS, **overrides})
    [document] = list(yaml.safe_load_all(text))
    return document


def installed_ray_version() -> str:
    import ray

    return ray.__version__


def load_launcher_config() -> dict:
    text = (CLUSTER / "ray-cluster.yaml").read_text(encoding="utf-8")
    assert set(PLACEHOLDER.findall(text)) == {"IMAGE"}
    assert "envsubst '$IMAGE' < cluster/ray-cluster.yaml" in text
    return yaml.safe_load(envsubst(text, {"IMAGE": f"rayproject/ray:{installed_ray_version()}-py311-gpu"}))


# --- JSON schemas of the parts of the KubeRay CRDs (ray.io/v1) and Serve config we rely on ----------

QUANTITY = {"anyOf": [{"type": "string", "minLength": 1}, {"type": "number", "exclusiveMinimum": 0}]}
RESOURCES = {
    "type": "object",
    "required": ["requests", "limits"],
    "properties": {
        "requests": {"type": "object", "required": ["cpu", "memory"], "additionalProperties": QUANTITY},
        "limits": {"type": "object", "required": ["cpu", "memory"], "additionalProperties": QUANTITY},
    },
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_1123},
        "image": {"type": "string", "minLength": 1},
        "resources": RESOURCES,
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        }
    },
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {"rayStartParams": STRING_MAP, "template": POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "properties": {
                    "groupName": {"type": "string", "pattern": DNS_1123},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "rayStartParams": STRING_MAP,
                    "template": POD_TEMPLATE,
                },
            },
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": DNS_1123, "maxLength": 63}, "labels": STRING_MAP},
}


def ray_resource(kind: str, spec_required: list[str], spec_properties: dict) -> dict:
    """The schema of a ray.io/v1 resource of ``kind`` whose spec has these keys."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": {"type": "object", "required": spec_required, "properties": spec_properties},
        },
    }


RAY_JOB = ray_resource("RayJob", ["entrypoint", "rayClusterSpec"], {
    "entrypoint": {"type": "string", "minLength": 1},
    "runtimeEnvYAML": {"type": "string"},
    "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "backoffLimit": {"type": "integer", "minimum": 0},
    "rayClusterSpec": RAY_CLUSTER_SPEC,
})
RAY_SERVICE = ray_resource("RayService", ["serveConfigV2", "rayClusterConfig"], {
    "serveConfigV2": {"type": "string", "minLength": 1},
    "upgradeStrategy": {
        "type": "object",
        "properties": {"type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]}},
    },
    "rayClusterConfig": RAY_CLUSTER_SPEC,
})
SERVE_CONFIG_KEYS = {
    "type": "object",
    "required": ["http_options", "applications"],
    "properties": {
        "http_options": {"type": "object", "required": ["host", "port"]},
        "applications": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "import_path", "args", "deployments"],
                "properties": {
                    "deployments": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                },
            },
        },
    },
}


def validate_with_ray_serve(config: dict) -> None:
    """Ray Serve's own schema of a config file (what `serve deploy` and KubeRay submit)."""
    from ray.serve.schema import ServeDeploySchema

    if hasattr(ServeDeploySchema, "model_validate"):  # pydantic 2
        ServeDeploySchema.model_validate(config)
    else:
        ServeDeploySchema.parse_obj(config)
