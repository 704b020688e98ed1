"""Serve a QA model over HTTP with Ray Serve, scaling to zero when idle.

    python -m serve_app --model DIR
    python -m serve_app --model DIR --host 0.0.0.0 --token-hashes-file token-hashes.txt
    python -m serve_app update --model NEW_DIR     # a running service: see python -m serve_app update --help

loads the Serve config (serve_app/config.yaml unless --config), applies the flags given, runs the
application on a new local Ray (or the cluster at --address), prints its URL and serves until Ctrl-C.
On 127.0.0.1 it may run without tokens; on any other address it needs API tokens (make one with
`python -m serve_app.tokens new --append token-hashes.txt`).
"""

import argparse
import signal
import sys
import time
import typing
from pathlib import Path

import ray
from ray import serve

from qa_common import QAConfig
from qa_common.config import add_dataclass_flags, dashed, flag_type, given_flags
from serve_app.app import DEFAULT_CONFIG, MODEL_DEPLOYMENT, load_serve_config, model_to_serve, run_config
from serve_app.retriever import RETRIEVER_DEPLOYMENT
from serve_app.settings import ServeArgs

# Flags of the Serve config's other sections: flag -> (section, key); section "http_options",
# "autoscaling_config" (QAModel's) or "ray_actor_options" (QAModel's). Every ServeArgs field has a
# flag of its own name that overrides args (generated below); QAConfig's flags go to args.qa.
DEPLOYMENT_FLAGS = {
    "host": (("http_options", "host"), str, "HTTP host; 0.0.0.0 accepts requests from other machines"),
    "port": (("http_options", "port"), int, "HTTP port"),
    "min_replicas": (("autoscaling_config", "min_replicas"), int,
                     "model replicas when idle; 0 lets the model scale to zero"),
    "max_replicas": (("autoscaling_config", "max_replicas"), int, "most model replicas under load"),
    "downscale_to_zero_delay_s": (("autoscaling_config", "downscale_to_zero_delay_s"), float,
                                  "idle seconds before the last replica stops"),
    "num_cpus": (("ray_actor_options", "num_cpus"), float, "CPUs per model replica"),
    "num_gpus": (("ray_actor_options", "num_gpus"), float, "GPUs per model replica"),
}
# --model has its own flag (with the quickstart default); qa: QAConfig's flags; previous_model: set by update
NOT_FLAGS = ("model", "qa", "previous_model")


def add_serve_args_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServeArgs field (help and default from the field), all defaulting to None: not given."""
    group = parser.add_argument_group("application (ServeArgs; defaults as in serve_app.settings)")
    for name, field in ServeArgs.model_fields.items():
        if name in NOT_FLAGS:
            continue
        help_text = f"{field.description} (default: {field.default})"
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal:
            group.add_argument(dashed(name), choices=typing.get_args(annotation), default=None, help=help_text)
        elif flag_type(annotation) is bool:
            group.add_argument(dashed(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(dashed(name), type=flag_type(annotation), default=None, metavar=name.upper(),
                               help=help_text)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags not given keep the config file's values, else the defaults shown.",
    )
    parser.add_argument("--model", help="model directory or Hub name (default: the config file's args.model; the "
                        "packaged one serves what python -m train_job exports)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config file (default: %(default)s)")
    parser.add_argument("--address", default="local", help="Ray cluster to join, e.g. auto (default: a new local Ray)")
    for flag, (_, kind, help_text) in DEPLOYMENT_FLAGS.items():
        parser.add_argument(dashed(flag), type=kind, help=f"{help_text} (default: the config file's)")
    add_serve_args_flags(parser)
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
    for flag, ((section, key), _, _) in DEPLOYMENT_FLAGS.items():
        if getattr(flags, flag) is not None:
            sections[section][key] = getattr(flags, flag)
    for name in ServeArgs.model_fields:
        if name not in NOT_FLAGS and getattr(flags, name) is not None:
            sections["args"][name] = getattr(flags, name)
    qa_flags = given_flags(flags, QAConfig)
    if qa_flags:
        sections["args"]["qa"] = {**sections["args"].get("qa", {}), **qa_flags}
    if flags.model:
        sections["args"]["model"] = flags.model
    elif not sections["args"].get("model"):
        raise ValueError("no model to serve: pass --model DIR (a model directory or a Hub name)")
    sections["args"]["model"] = model_to_serve(sections["args"]["model"])
    for key in ("token_hashes_file", "audit_log", "library", "feedback", "snapshot_dir"):  # relative to here, not to the Ray worker's directory
        if sections["args"].get(key):
            sections["args"][key] = str(Path(sections["args"][key]).expanduser().resolve())
    if flags.address == "local" and sections["args"].get("library") and not sections["args"].get("reader_threads"):
        sections["args"]["reader_threads"] = one_machine_reader_threads(app_config)
    return config


def one_machine_reader_threads(app_config: dict) -> int:
    """The reader's intra-op threads on a Ray of this process's own (one machine) serving a library:
    its replica's CPUs and the retriever's. A question is searched, then read, so the retriever's CPUs
    idle while the reader reads it; and on a small machine a second model replica does not fit beside
    the retriever, so one reader on one thread is the bottleneck at every load (BENCHMARKS.md,
    "Reader threads on one machine")."""
    from serve_app.update import application_options

    options = application_options(app_config)  # the Retriever's own options under the config's, as Serve runs them
    cpus = [options.get(name, {}).get("ray_actor_options", {}).get("num_cpus", 1)  # Serve's default: one per replica
            for name in (MODEL_DEPLOYMENT, RETRIEVER_DEPLOYMENT)]
    return max(1, int(sum(cpus)))


def _stop(signum, frame):
    raise KeyboardInterrupt


def _connected() -> None:
    """Once Ray is up: a service manager's stop (SIGTERM) shuts down as Ctrl-C does from here on, also while the
    replicas are starting (``ray.init`` installs Ray's own handler, which dumps a stack and aborts)."""
    signal.signal(signal.SIGTERM, _stop)
    print("Ray is up: starting Serve and the replicas ...", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["update"]:
        from serve_app.update import main as update

        sys.exit(update(argv[1:]))
    flags = parse_args(argv)
    ours = None  # the application this process deployed
    try:
        config = configure(load_serve_config(flags.config), flags)
        [app_config] = config["applications"]
        url = run_config(config, ray_address=flags.address, on_connected=_connected)
        ours = app_config["name"]
        print(f"\nServing {app_config['args']['model']} at {url}  (API docs: {url.rstrip('/')}/docs)")
        if app_config["args"].get("library"):
            print(f"Ask the library {app_config['args']['library']}: POST {url.rstrip('/')}/v1/ask, or the page's "
                  "library mode")
        if app_config["args"].get("feedback"):
            print(f"Ratings (POST {url.rstrip('/')}/v1/feedback, the page's buttons) are kept in "
                  f"{app_config['args']['feedback']}: python -m serve_app.feedback --help")
        print(f"Another model, without downtime: python -m serve_app update --address "
              f"{ray.get_runtime_context().gcs_address} --model NEW_DIR")
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(3600)
    except (ValueError, FileNotFoundError) as error:  # bad model, arguments or config (pydantic's errors included)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("Stopping.")
    finally:
        if ray.is_initialized():
            if flags.address != "local" and ours:  # leave a shared cluster as we found it
                serve.delete(ours)
            ray.shutdown()


if __name__ == "__main__":
    main()
