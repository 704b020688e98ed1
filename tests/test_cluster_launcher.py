"""The cluster launcher YAML (`ray up cluster/ray-cluster.yaml`) validates with Ray's own cluster-config schema
and defaults, and runs the Ray the project pins; cluster/README.md's edits of the Serve config still apply."""

from __future__ import annotations

import copy
import re

import jsonschema
import yaml

from cluster_files import CLUSTER, ROOT, SERVE_CONFIG, installed_ray_version, load_launcher_config, validate_with_ray_serve

CLUSTER_LAUNCHER_KEYS = {
    "type": "object",
    "required": ["cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                 "setup_commands", "file_mounts"],
    "properties": {
        "cluster_name": {"type": "string", "minLength": 1},
        "max_workers": {"type": "integer", "minimum": 1},
        "provider": {"type": "object", "required": ["type"]},
        "docker": {"type": "object", "required": ["image"]},
        "available_node_types": {
            "type": "object",
            "minProperties": 2,
            "additionalProperties": {"type": "object", "required": ["resources", "node_config"]},
        },
        "head_node_type": {"type": "string"},
        "setup_commands": {"type": "array", "minItems": 1, "items": {"type": "string"}},
    },
}


def test_cluster_launcher_config_validates_with_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_launcher_config()
    jsonschema.validate(config, CLUSTER_LAUNCHER_KEYS)
    # What `ray up` does before launching anything: fill in the provider's defaults, then validate
    # against Ray's cluster-config schema (ray/autoscaler/ray-schema.json).
    validate_config(prepare_config(copy.deepcopy(config)))

    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    assert workers and all(node.get("min_workers", 0) == 0 for node in workers.values()), "workers should scale to zero"
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]
    assert any(node["node_config"]["InstanceType"].startswith(("g", "p")) for node in workers.values()), \
        "a GPU worker node type"
    # The project travels with the cluster: synced from the checkout, installed by setup_commands.
    [target] = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(target in command and "pip install" in command for command in config["setup_commands"])


def test_dockerfile_and_launcher_use_the_pinned_ray():
    """Cluster and client run the same Ray (pyproject.toml pins it) on a Python the project supports."""
    ray_version = installed_ray_version()
    pinned = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pinned and pinned.group(1) == ray_version
    dockerfile = (CLUSTER / "Dockerfile").read_text(encoding="utf-8")
    [base] = re.findall(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, flags=re.M)
    launcher_example = re.search(r"IMAGE=(rayproject/ray:\S+)", (CLUSTER / "ray-cluster.yaml").read_text(encoding="utf-8"))
    assert launcher_example and launcher_example.group(1) == base
    match = re.fullmatch(r"rayproject/ray:([0-9.]+)-py3(\d+)-gpu", base)
    assert match and match.group(1) == ray_version and int(match.group(2)) >= 11


def test_readme_sed_edits_of_the_serve_config_still_apply():
    """cluster/README.md adapts serve_app/config.yaml with sed: each edit must find its text."""
    readme = (CLUSTER / "README.md").read_text(encoding="utf-8")
    edits = re.findall(r'"s\|([^|]*)\|([^|]*)\|"', readme)
    assert len(edits) >= 4
    original = SERVE_CONFIG.read_text(encoding="utf-8")
    for pattern, replacement in edits:
        assert pattern in original, f"README's sed edit {pattern!r} no longer matches serve_app/config.yaml"
        edited = original.replace(pattern, replacement.replace("$PWD", "/abs"))
        config = yaml.safe_load(edited)
        assert config != yaml.safe_load(original)
        validate_with_ray_serve(config)
