"""Serve a QA model over HTTP with Ray Serve, scaling to zero when idle.

    python -m serve_app --model DIR
    python -m serve_app --model DIR --host 0.0.0.0 --token-hashes-file token-hashes.txt

loads the Serve config (serve_app/config.yaml unless --config), applies the flags given, runs the
application on a new local Ray (or the cluster at --address), prints its URL and serves until Ctrl-C.
On 127.0.0.1 it may run without tokens; on any other address it needs API tokens (make one with
`python -m serve_app.tokens new --append token-hashes.txt`).
"""

import argparse
import sys
import time
from pathlib import Path

import ray
from ray import serve

from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, given_flags
from qa_common.backends import BACKENDS
from qa_common.modeling import SERVING_DTYPES
from serve_app.app import DEFAULT_CONFIG, MODEL_DEPLOYMENT, load_serve_config, run_config

QUICKSTART_MODEL = Path("runs/quickstart/model")

# flag -> (section, key) of the config it overrides; section "args", "http_options",
# "autoscaling_config" (QAModel's) or "ray_actor_options" (QAModel's). QAConfig's flags go to args.qa.
OVERRIDES = {
    "host": ("http_options", "host"),
    "port": ("http_options", "port"),
    "max_batch_size": ("args", "max_batch_size"),
    "batch_wait_timeout_s": ("args", "batch_wait_timeout_s"),
    "max_body_bytes": ("args", "max_body_bytes"),
    "dtype": ("args", "dtype"),
    "token_hashes_file": ("args", "token_hashes_file"),
    "insecure_no_auth": ("args", "insecure_no_auth"),
    "audit_log": ("args", "audit_log"),
    "max_windows_per_request": ("args", "max_windows_per_request"),
    "request_deadline_s": ("args", "request_deadline_s"),
    "backend": ("args", "backend"),
    "min_replicas": ("autoscaling_config", "min_replicas"),
    "max_replicas": ("autoscaling_config", "max_replicas"),
    "downscale_to_zero_delay_s": ("autoscaling_config", "downscale_to_zero_delay_s"),
    "num_cpus": ("ray_actor_options", "num_cpus"),
    "num_gpus": ("ray_actor_options", "num_gpus"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags not given keep the config file's values.",
    )
    parser.add_argument("--model", help=f"model directory or Hub name (default: the config's, {QUICKSTART_MODEL})")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)")
    parser.add_argument("--address", default="local", help="Ray cluster to join, e.g. auto (default: a new local Ray)")
    parser.add_argument("--host", help="HTTP host; 0.0.0.0 accepts requests from other machines")
    parser.add_argument("--port", type=int, help="HTTP port")
    parser.add_argument("--max-batch-size", type=int, help="most questions answered in one model call")
    parser.add_argument("--batch-wait-timeout-s", type=float, help="how long a batch waits to fill up")
    parser.add_argument("--max-body-bytes", type=int, help="larger request bodies get HTTP 413")
    parser.add_argument("--token-hashes-file", help="file of the SHA-256 hashes of the accepted API tokens "
                        "(also read: $QA_TOKEN_HASHES); see python -m serve_app.tokens")
    parser.add_argument("--insecure-no-auth", action="store_true", default=None,
                        help="serve without tokens on a non-loopback address (never with patient data)")
    parser.add_argument("--audit-log", help="append the JSON audit lines to this file (default: standard error)")
    parser.add_argument("--max-windows-per-request", type=int, help="requests needing more model windows get 413")
    parser.add_argument("--request-deadline-s", type=float, help="requests not answered within this get 503")
    parser.add_argument("--dtype", choices=SERVING_DTYPES, help="auto: bfloat16 on a GPU")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="torch, onnx, onnx-int8 or auto (on CPU: the fastest exported backend within the F1 bound)")
    parser.add_argument("--min-replicas", type=int, help="model replicas when idle; 0 lets the model scale to zero")
    parser.add_argument("--max-replicas", type=int, help="most model replicas under load")
    parser.add_argument("--downscale-to-zero-delay-s", type=float, help="idle seconds before the last replica stops")
    parser.add_argument("--num-cpus", type=float, help="CPUs per model replica")
    parser.add_argument("--num-gpus", type=float, help="GPUs per model replica")
    add_dataclass_flags(parser, QAConfig, defaults={f: "the model's qa_config.json" for f in QAConfig.__dataclass_fields__})
    return parser.parse_args(argv)


def configure(config: dict, flags: argparse.Namespace) -> dict:
    """``config`` with the model and the flags that were given written into it."""
    [app_config] = config["applications"]
    model_options = next((d for d in app_config.setdefault("deployments", []) if d.get("name") == MODEL_DEPLOYMENT), None)
    if model_options is None:
        model_options = {"name": MODEL_DEPLOYMENT}
        app_config["deployments"].append(model_options)
    sections = {
        "args": app_config.setdefault("args", {}),
        "http_options": config.setdefault("http_options", {}),
        "autoscaling_config": model_options.setdefault("autoscaling_config", {}),
        "ray_actor_options": model_options.setdefault("ray_actor_options", {}),
    }
    for flag, (section, key) in OVERRIDES.items():
        if getattr(flags, flag) is not None:
            sections[section][key] = getattr(flags, flag)
    qa_flags = given_flags(flags, QAConfig)
    if qa_flags:
        sections["args"]["qa"] = {**sections["args"].get("qa", {}), **qa_flags}
    sections["args"]["model"] = model_to_serve(flags.model or sections["args"].get("model") or str(QUICKSTART_MODEL))
    for key in ("token_hashes_file", "audit_log"):  # relative to here, not to the Ray worker's directory
        if sections["args"].get(key):
            sections["args"][key] = str(Path(sections["args"][key]).expanduser().resolve())
    return config


def model_to_serve(model: str) -> str:
    """An absolute path for a local directory (Ray workers need not share our working directory)."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if path == QUICKSTART_MODEL:
        sys.exit(
            f"no model to serve: {QUICKSTART_MODEL} does not exist. Train one first "
            "(`python -m train_job`) or pass --model DIR (a model directory or a Hub name)."
        )
    return model  # a Hub name, or a missing directory that the application builder reports


def main(argv=None) -> None:
    flags = parse_args(argv)
    config = configure(load_serve_config(flags.config), flags)
    [app_config] = config["applications"]
    try:
        url = run_config(config, ray_address=flags.address)
        print(f"\nServing {app_config['args']['model']} at {url}  (API docs: {url.rstrip('/')}/docs)")
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except (ValueError, FileNotFoundError) as error:  # bad model, arguments or config (pydantic's errors included)
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        print("Stopping.")
    finally:
        if ray.is_initialized():
            if flags.address != "local":  # leave a shared cluster as we found it
                serve.delete(app_config["name"])
            ray.shutdown()


if __name__ == "__main__":
    main()
