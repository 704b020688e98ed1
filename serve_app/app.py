"""The Ray Serve application: a light FastAPI ingress (``serve_app.ingress``) in front of a batched,
autoscaled QA model (``serve_app.model``); this module builds and runs it.

Deployment options (replicas, queues, autoscaling, CPUs/GPUs) are data: ``config.yaml`` next to this
file; the application's settings are ``serve_app.settings.ServeArgs``, with their defaults.
"""

import logging
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve import Application

from qa_common import QAConfig, load_qa_config, resolve_model_path
from qa_common.library.index import open_table, read_manifest
from qa_common.backends import ONNX_FILES, onnx_file
from serve_app import request_ids
from serve_app.auth import is_loopback, load_token_hashes
from serve_app.card import model_card
from serve_app.ingress import INGRESS_DEPLOYMENT, QAIngress
from serve_app.model import MODEL_DEPLOYMENT, QAModel
from serve_app.feedback.keeper import FEEDBACK_DEPLOYMENT, FeedbackKeeper
from serve_app.feedback.receipts import load_or_create_key
from serve_app.retriever import RETRIEVER_DEPLOYMENT, Retriever
from serve_app.settings import ServeArgs
from serve_app.snapshot import snapshot

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
logger = logging.getLogger(__name__)


def resolve_qa_config(model_path: str, args: ServeArgs) -> QAConfig:
    """The builder's ``qa`` overrides over the model directory's ``qa_config.json`` over the defaults."""
    return load_qa_config(model_path, **args.qa)


def load_serve_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """A Serve config file holding this one application."""
    config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    applications = config.get("applications") if isinstance(config, dict) else None
    if not isinstance(applications, list) or len(applications) != 1:
        raise ValueError(f"{path}: expected a Serve config with exactly one entry under 'applications'")
    return config


APP_NAME = load_serve_config()["applications"][0]["name"]  # the application's name, as config.yaml gives it


def model_to_serve(model: str) -> str:
    """An absolute path for a local model directory (Ray workers need not share our working
    directory); a Hub name (``org/name``) unchanged. A path that does not exist is an error, never
    a Hub download."""
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or len(path.parts) > 2:
        raise FileNotFoundError(f"no model to serve: {model} does not exist. Train one first (`python -m train_job`) "
                                "or pass --model DIR (a model directory or a Hub name).")
    return model


def deployment_options(app_config: dict) -> dict[str, dict]:
    """``{deployment name: .options() keyword arguments}`` from an application's ``deployments`` list."""
    options = {}
    for entry in app_config.get("deployments", []):
        entry = dict(entry)
        name = entry.pop("name", None)
        if name not in (INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, RETRIEVER_DEPLOYMENT, FEEDBACK_DEPLOYMENT):
            raise ValueError(f"the config names deployment {name!r}; this application has {INGRESS_DEPLOYMENT}, "
                             f"{MODEL_DEPLOYMENT}, {RETRIEVER_DEPLOYMENT} and {FEEDBACK_DEPLOYMENT}")
        options[name] = entry
    return options


def check_authentication(args: ServeArgs, bind_host: str | None, token_hashes: list[str] | None = None, *,
                         warn: bool = True) -> list[str]:
    """The accepted tokens' hashes (``token_hashes`` when given, else read from ``args.token_hashes_file``
    and the environment); refuses (ValueError) to serve without them except on loopback or when told.

    ``bind_host`` is the HTTP host the service listens on, None when unknown (``serve run``/``deploy``
    of a config file): unknown counts as reachable from other machines.
    """
    hashes = load_token_hashes(args.token_hashes_file) if token_hashes is None else token_hashes
    if hashes:
        return hashes
    where = f"on {bind_host}" if bind_host else "where other machines may reach it"
    if args.insecure_no_auth:
        if warn:
            logger.warning("serving WITHOUT authentication %s (insecure_no_auth): anyone who reaches it may send "
                           "documents; never do this with patient data", where)
    elif bind_host is not None and is_loopback(bind_host):
        if warn:
            logger.warning("serving without authentication on %s: only this machine can reach it. Give tokens "
                           "(python -m serve_app.tokens new) before serving on a network.", bind_host)
    else:
        raise ValueError(
            f"no API tokens: refusing to serve without authentication {where}. Make a token with "
            "`python -m serve_app.tokens new --append token-hashes.txt` and pass --token-hashes-file "
            "token-hashes.txt (args.token_hashes_file), or set $QA_TOKEN_HASHES; --insecure-no-auth "
            "(args.insecure_no_auth: true) serves without tokens anyway"
        )
    return []


def build_app(args: ServeArgs | dict, options: dict[str, dict], *, bind_host: str | None = None,
              deployed: dict | None = None, token_hashes: list[str] | None = None, warn: bool = True) -> Application:
    """The application for ``args`` and deployment ``options``; ``bind_host`` and ``token_hashes``: see
    check_authentication (``warn``: log serving without tokens). ``deployed`` (``{"application": its Serve config entry, "host": bind_host}``)
    is what the ingress hands ``python -m serve_app update``, with the token hashes it accepts added;
    None for an application deployed from a config file."""
    args = ServeArgs.model_validate(args)
    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; train one with `python -m train_job`, or pass another model directory (--model / args.model)"
        ) from None
    if not Path(model_path).is_dir():
        raise FileNotFoundError(
            f"{args.model!r} is no model directory here: the service serves local directories only, never a download "
            "when a replica starts. Download a Hub model at a pinned revision first (`hf download NAME --revision "
            "COMMIT --local-dir DIR`) and serve DIR")
    model_path = snapshot(model_path, args.snapshot_dir)  # what every replica loads, however late it starts
    args = args.model_copy(update={"model": model_path})
    if deployed is not None:
        application = deployed["application"]
        deployed = {**deployed, "application": {**application, "args": {**application.get("args", {}),
                                                                          "model": model_path}}}
    if args.backend in ONNX_FILES:
        onnx_file(model_path, args.backend)  # a missing export fails here, naming the command that writes it
    qa_config = resolve_qa_config(model_path, args)
    model_options, ingress_options = options.get(MODEL_DEPLOYMENT, {}), options.get(INGRESS_DEPLOYMENT, {})
    max_ongoing = model_options.get("max_ongoing_requests", 5)  # Serve's default
    if max_ongoing < args.max_batch_size:
        raise ValueError(
            f"QAModel max_ongoing_requests ({max_ongoing}) is below max_batch_size ({args.max_batch_size}): a replica "
            "never holds more requests than that at once, so its batches could not fill; raise it"
        )
    if args.library:  # a missing index, or one of an earlier format, fails here, naming the command that builds it
        open_table(Path(args.library), read_manifest(Path(args.library)).version)
    if args.feedback:
        load_or_create_key(args.feedback)  # an unwritable folder fails here; replicas then find the key made
    token_hashes = check_authentication(args, bind_host, token_hashes, warn=warn)
    if deployed is not None:
        deployed = {**deployed, "token_hashes": token_hashes}
    model = QAModel.options(**model_options).bind(model_path, qa_config, args)
    retriever = Retriever.options(**options.get(RETRIEVER_DEPLOYMENT, {})).bind(args.library) if args.library else None
    keeper = FeedbackKeeper.options(**{**options.get(FEEDBACK_DEPLOYMENT, {}), "num_replicas": 1}).bind(
        args.feedback, args.library) if args.feedback else None
    card = model_card(model_path, args, qa_config, model_options)
    return QAIngress.options(**ingress_options).bind(model, args, model_path, qa_config, card, token_hashes, deployed,
                                                     retriever, keeper)


def app_builder(args: dict) -> Application:
    """Entry point of ``serve run``/``serve deploy`` (``import_path: serve_app.app:app_builder``).

    The packaged ``config.yaml`` gives the defaults: its ``args`` under ``args``, its deployment
    options (a config file being deployed then overrides them with its own ``deployments``).
    """
    [packaged] = load_serve_config()["applications"]
    return build_app({**packaged.get("args", {}), **args}, deployment_options(packaged))


def serving_http_options() -> tuple[str, int]:
    """``(host, port)`` the cluster's Serve proxies really listen on: the options of the Serve that
    runs, which a new ``serve.start`` does not change (Ray only warns)."""
    from ray.serve.context import _get_global_client

    options = _get_global_client().http_config
    return options.host, options.port


def run_config(config: dict, *, ray_address: str = "local", on_connected=None) -> str:
    """Build the config's application, start Serve with its HTTP options and run it; return its URL.

    Connects to Ray at ``ray_address`` (``local``: a new local instance without the dashboard and its
    Jobs API, with Ray's token authentication, on by default for a local Ray) unless already connected. Authentication is checked against the
    host the proxies really listen on, and an application of the same name that runs already is
    never replaced (that is ``python -m serve_app update``'s job, through the gate). Returns once
    the application is running. ``on_connected()`` runs once Ray is connected, before Serve starts
    (``ray.init`` installs Ray's own signal handlers: a caller's go after it).
    """
    [app_config] = config["applications"]
    http_options = dict(config.get("http_options") or {})
    args, options = app_config.get("args", {}), deployment_options(app_config)
    build_app(args, options, bind_host=http_options.get("host", "127.0.0.1"), warn=False)  # fails before starting anything
    if not ray.is_initialized():
        if ray_address == "local":
            request_ids.set_proxy_environment()  # the proxies we start take client request ids out
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=ray_address)
    if on_connected is not None:
        on_connected()
    serve.start(http_options=http_options)
    host, port = serving_http_options()
    if app_config["name"] in serve.status().applications:
        raise ValueError(f"an application named {app_config['name']!r} runs on this cluster already: change its "
                         "model with `python -m serve_app update` (gated, without downtime), or give this one "
                         "another name in the config")
    app = build_app(args, options, bind_host=host, deployed={"application": app_config, "host": host})
    route_prefix = app_config.get("route_prefix", "/")
    serve.run(app, name=app_config["name"], route_prefix=route_prefix)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown_host}:{port}{route_prefix}"
