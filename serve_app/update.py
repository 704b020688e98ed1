"""Put a new model in front of a running service without dropping a request, or take it back.

    python -m serve_app update --model runs/squad-minilm/model          # the service on this machine
    python -m serve_app update --model DIR --validate-on dev.json --min-f1 70 --max-f1-drop 1
    python -m serve_app update --model DIR --improve-on runs/feedback-export/validation.json \
        --validate-on squad-slice.json --max-f1-drop 1     # better on the feedback, no worse elsewhere
    python -m serve_app update --rollback                               # back to the model before
    ray job submit --address http://HEAD:8265 -- python -m serve_app update --model /shared/models/v2

Asks the running application (``python -m serve_app`` started it) what it serves, checks the new
model here first (``serve_app.gate``: it loads, its settings are valid, it answers; optionally a
validation F1), and only then redeploys the application with it: Ray Serve's rolling update, with
``max_surge_percent`` so each old replica keeps answering until its replacement has passed its
health check, then drains the requests it holds. Every answer carries ``X-Model-Version``; the
command returns once only the new model takes requests. A refused update changes nothing and
exits 2. The replica count is kept as it is (a service at zero replicas loads nothing until its
next request), and so are the tokens the service accepts (never re-read from the environment of the
shell that updates): ``--token-hashes-file`` changes them, explicitly. An application deployed from a config file (``serve deploy``, a RayService) is
updated by editing ``args.model`` there and deploying it again (docs/serving.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

from serve_app.app import APP_NAME
from serve_app.gate import GateError, check_f1, check_gain, check_model, validation_f1



class RolloutError(RuntimeError):
    """The gate passed, but the rollout failed on the cluster."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app update", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="the new model directory (train_job's or train_job.tune's OUTPUT_DIR/model)")
    target.add_argument("--rollback", action="store_true", help="return to the model the last update replaced")
    parser.add_argument("--address", default="auto", help="the Ray cluster running the service (default: %(default)s, "
                        "the one on this machine)")
    parser.add_argument("--app", default=APP_NAME, help="the Serve application (default: %(default)s)")
    parser.add_argument("--validate-on", metavar="FILE", help="SQuAD-format file with gold answers the new model "
                        "answers (as served) before the update; needs --min-f1 or --max-f1-drop")
    parser.add_argument("--min-f1", type=float, help="refuse the update when the new model's F1 on FILE is below this")
    parser.add_argument("--max-f1-drop", type=float, help="refuse it when the new model's F1 on FILE is more than "
                        "this many points below the serving model's on the same file")
    parser.add_argument("--improve-on", metavar="FILE", help="SQuAD-format file (e.g. the validation split of "
                        "`python -m serve_app.feedback export`) on which the new model's F1 must beat the serving "
                        "model's by more than --min-gain points")
    parser.add_argument("--min-gain", type=float, default=0.0, help="with --improve-on: the least gain in F1 points "
                        "(default: %(default)s: any gain)")
    parser.add_argument("--model-name", help="the name /v1/model shows (default: the new model directory's name)")
    parser.add_argument("--token-hashes-file", metavar="FILE", help="accept the tokens whose hashes FILE holds "
                        "from now on (default: keep the tokens the service accepts now)")
    flags = parser.parse_args(argv)
    if flags.validate_on and flags.min_f1 is None and flags.max_f1_drop is None:
        parser.error("--validate-on needs --min-f1 or --max-f1-drop: what F1 must the new model reach?")
    if not flags.validate_on and (flags.min_f1 is not None or flags.max_f1_drop is not None):
        parser.error("--min-f1 and --max-f1-drop need --validate-on FILE")
    return flags


def connect(address: str) -> None:
    import ray

    if ray.is_initialized():  # called from a driver of that cluster already
        return
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except ConnectionError as error:
        raise GateError(f"no running Ray cluster at --address {address} ({error}): is the service running "
                        "(python -m serve_app)? Give the cluster's address") from None


def deployed_application(app: str) -> dict:
    """``{"application": Serve config entry, "host": HTTP host}`` as the service was last deployed."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        handle = serve.get_app_handle(app)
    except RayServeException:
        raise GateError(f"no Serve application {app!r} runs on this cluster; start one with python -m serve_app "
                        "or give --app") from None
    deployed = handle.deployed_config.remote().result(timeout_s=60)
    if deployed is None:
        raise GateError(f"application {app!r} was deployed from a config file (serve deploy, a RayService): "
                        "edit args.model there and deploy it again (docs/serving.md, 'Updating the model')")
    return deployed


def running_replicas(app: str) -> dict[str, int]:
    """``{deployment: replicas running now}``."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: sum(count for state, count in status.replica_states.items()
                      if getattr(state, "value", state) == "RUNNING") for name, status in deployments.items()}


def surge_fits(options: dict[str, dict], running: dict[str, int], free: dict[str, float]) -> tuple[bool, str]:
    """Whether the replicas a surge adds (``max_surge_percent`` of those running, rounded up, as Serve
    counts them) fit in the cluster's ``free`` resources; and what is short."""
    need = {"CPU": 0.0, "GPU": 0.0}
    for name, count in running.items():
        entry = options.get(name, {})
        extra = math.ceil(entry.get("max_surge_percent", 0) * count / 100)
        actor_options = entry.get("ray_actor_options", {})
        need["CPU"] += extra * actor_options.get("num_cpus", 1)  # Serve's default: one CPU per replica
        need["GPU"] += extra * actor_options.get("num_gpus", 0)
    short = [f"{need[kind]:g} {kind}s (free: {free.get(kind, 0):g})" for kind in need
             if need[kind] > free.get(kind, 0) + 1e-9]
    return not short, ", ".join(short)


def application_options(application: dict) -> dict[str, dict]:
    """Every deployment's options as Serve runs them: the config's entries, over the Retriever's own
    (``RETRIEVER_OPTIONS``) when the application serves a library."""
    from serve_app.app import deployment_options
    from serve_app.retriever import RETRIEVER_DEPLOYMENT, RETRIEVER_OPTIONS

    options = deployment_options(application)
    if application.get("args", {}).get("library"):
        options[RETRIEVER_DEPLOYMENT] = {**copy.deepcopy(RETRIEVER_OPTIONS), **options.get(RETRIEVER_DEPLOYMENT, {})}
    return options


def rollout_options(options: dict[str, dict], running: dict[str, int], *, surge: bool) -> dict[str, dict]:
    """The deployment options of this rollout: as configured (``max_surge_percent``), without a surge
    when there is no room for it, and each autoscaled deployment's replica count kept as it is."""
    options = copy.deepcopy(options)
    for name, entry in options.items():
        if not surge:
            entry["max_surge_percent"] = 0
        scaling = entry.get("autoscaling_config")
        if scaling is not None:
            # A redeployment starts from initial_replicas: start from what runs now (0 stays 0).
            lowest, highest = scaling.get("min_replicas", 1), scaling.get("max_replicas", 1)
            scaling["initial_replicas"] = min(max(running.get(name, 0), lowest), highest)
    return options


def tokens_from(hashes_file: str) -> list[str]:
    from serve_app.auth import parse_token_hashes

    try:
        hashes = parse_token_hashes(Path(hashes_file).read_text(encoding="utf-8"), source=hashes_file)
    except (OSError, ValueError) as error:
        raise GateError(f"--token-hashes-file: {error}") from None
    if not hashes:
        raise GateError(f"--token-hashes-file {hashes_file} holds no token hash: the service would accept no token")
    return hashes


def update(flags: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from serve_app.app import build_app, model_to_serve
    from serve_app.snapshot import snapshot
    from serve_app.settings import ServeArgs

    deployed = deployed_application(flags.app)
    application = copy.deepcopy(deployed["application"])
    serving = ServeArgs.model_validate(application["args"])
    if flags.rollback:
        if not serving.previous_model:
            raise GateError("nothing to roll back to: this service has not been updated (no previous model)")
        target = serving.previous_model
    else:
        try:
            target = snapshot(model_to_serve(flags.model), serving.snapshot_dir)  # exactly what replicas will load
        except (FileNotFoundError, NotADirectoryError) as error:
            raise GateError(f"{error}; give a model directory written by train_job (OUTPUT_DIR/model)") from None
        except OSError as error:
            raise GateError(str(error)) from None
    if target == serving.model:
        raise GateError(f"{flags.model or target} is the model being served already (the same files)")
    new_args = serving.model_copy(update={"model": target, "previous_model": serving.model,
                                          "model_name": flags.model_name})
    print(f"checking {target} ...", flush=True)
    checked = check_model(target, new_args)
    serving_checked = None
    if flags.max_f1_drop is not None or flags.improve_on:
        serving_checked = check_model(serving.model, serving)
    if flags.improve_on:
        new_f1, serving_f1 = validation_f1(checked, flags.improve_on), validation_f1(serving_checked, flags.improve_on)
        print(f"F1 on {flags.improve_on}: the new model's {new_f1:.2f}, the serving model's {serving_f1:.2f}",
              flush=True)
        check_gain(new_f1, serving_f1, min_gain=flags.min_gain)
    if flags.validate_on:
        new_f1 = validation_f1(checked, flags.validate_on)
        serving_f1 = validation_f1(serving_checked, flags.validate_on) if flags.max_f1_drop is not None else None
        shown = f", the serving model's {serving_f1:.2f}" if serving_f1 is not None else ""
        print(f"validation F1 on {flags.validate_on}: the new model's {new_f1:.2f}{shown}", flush=True)
        check_f1(new_f1, min_f1=flags.min_f1, serving_f1=serving_f1, max_f1_drop=flags.max_f1_drop)
    del checked, serving_checked

    if flags.token_hashes_file:
        token_hashes = tokens_from(flags.token_hashes_file)
        new_args = new_args.model_copy(update={"token_hashes_file": str(Path(flags.token_hashes_file).resolve())})
    else:
        token_hashes = deployed["token_hashes"]  # as deployed: never this shell's environment
    application["args"] = new_args.model_dump(exclude_defaults=True)
    options = application_options(application)
    running = running_replicas(flags.app)
    surge, short = surge_fits(options, running, ray.available_resources())
    if not surge:
        print(f"warning: no room for the new replicas beside the old ones (they need {short}): each old replica "
              "stops before its replacement starts, and requests wait for the new model's cold start meanwhile",
              file=sys.stderr, flush=True)
    app = build_app(application["args"], rollout_options(options, running, surge=surge), bind_host=deployed["host"],
                    deployed={**deployed, "application": application}, token_hashes=token_hashes)
    print(f"rolling out (replicas now: {running}); the old model answers until its replacement is healthy ...",
          flush=True)
    started = time.perf_counter()
    try:
        serve.run(app, name=application["name"], route_prefix=application.get("route_prefix", "/"))
    except RuntimeError as error:  # Serve's "Deploying application ... failed"
        raise RolloutError(f"the new replicas did not start ({error}); replicas of the old model that were still "
                           "up keep answering. Is the model directory readable on every node? "
                           f"`python -m serve_app update --model {serving.model}` redeploys the old one") from None
    print(f"done in {time.perf_counter() - started:.1f} s: every new request goes to {target}. "
          "`python -m serve_app update --rollback` returns to the model before.", flush=True)


def main(argv=None) -> int:
    flags = parse_args(argv)
    try:
        connect(flags.address)
        update(flags)
    except GateError as error:
        print(f"error: {error}\nnothing was changed: the service answers with the model it had.", file=sys.stderr)
        return 2
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
