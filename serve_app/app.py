"""The Ray Serve application: a light FastAPI ingress in front of a batched, autoscaled QA model.

- ``QAIngress`` (one small replica that never scales to zero) serves the web page, checks the
  bearer token, validates requests, counts the model windows each needs (413 over the budget) and
  fans each question out to the model deployment through a ``DeploymentHandle``, within a
  per-request deadline (503 with Retry-After beyond it, or when the model's queue is full). A
  question whose model replica dies under it is asked again once. Every request leaves one JSON
  line in the audit log (ids, sizes, times, statuses; never text).
- ``QAModel`` holds the model. Its ``answer`` method takes one question, and ``@serve.batch``
  gathers concurrent questions; each batch runs as ``qa_common.answer_questions`` calls of at most
  ``max_windows_per_call`` windows (a "model call", counted in ``describe()``), with the deadline
  checked between calls. It may scale to zero; a request arriving then waits in the handle's queue
  for the cold start. ``check_health`` runs a tiny forward pass, so a replica that cannot run the
  model is replaced.

Deployment options (replicas, queues, autoscaling, CPUs/GPUs) are data: ``config.yaml`` next to this file.
"""

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path

import ray
import yaml
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram
from starlette.exceptions import HTTPException

from qa_common import (
    QAConfig, Question, answer_questions, count_windows, load_qa_config, load_tokenizer,
    resolve_model_path,
)
from qa_common.backends import ONNX_FILES, load_runner, onnx_file, resolve_backend
from qa_common.modeling import dtype_name, torch_dtype
from serve_app import audit, request_ids
from serve_app.auth import TokenChecker, is_loopback, load_token_hashes
from serve_app.schemas import (
    MAX_QUESTION_CHARS, MAX_QUESTIONS_PER_REQUEST, REQUEST_SHAPE, AnswerResponse, ErrorResponse, InvalidRequest, ServeArgs, parse_questions, request_body_schema,
)
from serve_app.work import DEADLINE, WorkItem, answer_in_chunks

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
INDEX_PAGE = Path(__file__).with_name("static") / "index.html"
INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT = "QAIngress", "QAModel"  # the deployments' names, as in config.yaml
logger = logging.getLogger(__name__)
HEALTH_PROBE = Question("Is the model able to run?", "The model runs.")


@serve.deployment(name=MODEL_DEPLOYMENT)
class QAModel:
    """One copy of the model; answers questions in dynamic batches, within a window budget per call."""

    def __init__(self, model_path: str, qa_config: QAConfig, args: ServeArgs):
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.runner, self.tokenizer, self.backend = load_model(model_path, args, device=self.device, threads=threads)
        self.qa_config = qa_config
        self.forward_batch_size = args.forward_batch_size
        self.max_windows_per_call = args.max_windows_per_call
        self.answer.set_max_batch_size(args.max_batch_size)
        self.answer.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.model_calls = 0
        self.batch_questions = Histogram(
            "qa_model_batch_questions", "Questions per dynamic batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self.call_windows = Histogram(
            "qa_model_call_windows", "Windows per model call.", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
        )
        self.call_seconds = Histogram(
            "qa_model_call_seconds", "Seconds per model call (tokenisation, forward passes, decoding).",
            boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30],
        )

    @serve.batch
    async def answer(self, items: list[WorkItem]) -> list[dict]:
        """Per item ``{"answers": [...]}``, or ``{"error": ...}`` for that item alone (see serve_app.work)."""
        self.batch_questions.observe(len(items))
        return await answer_in_chunks(items, self.max_windows_per_call, self.model_call)

    async def model_call(self, items: list[WorkItem]) -> list[list[dict]]:
        self.model_calls += 1
        started = time.perf_counter()
        # In a thread, so the replica keeps queueing the next batch while the model runs.
        answers = await asyncio.to_thread(
            answer_questions, self.runner, self.tokenizer, [item.question for item in items], self.qa_config,
            batch_size=self.forward_batch_size,
        )
        self.call_seconds.observe(time.perf_counter() - started)
        self.call_windows.observe(sum(item.windows for item in items))
        return answers

    async def check_health(self) -> None:
        """Serve's health check: a replica that cannot run a forward pass raises, and is replaced."""
        await asyncio.to_thread(answer_questions, self.runner, self.tokenizer, [HEALTH_PROBE], self.qa_config)

    def describe(self) -> dict:
        """How many model calls this replica has run, and where (for operators and tests)."""
        return {"model_calls": self.model_calls, "device": self.device, **self.backend}


def load_model(model_path: str, args: ServeArgs, *, device: str, threads: int) -> tuple:
    """``(runner, tokenizer, info)`` of a replica: ``args.backend`` (``auto`` reads the model's
    onnx_export.json) on ``device``, with ``threads`` intra-op threads (one per CPU of the replica)."""
    runner, tokenizer, info = load_runner(model_path, args.backend, device=device, dtype=torch_dtype(args.dtype, device),
                                          threads=threads, max_f1_loss=args.max_f1_loss)
    return runner, tokenizer, {"threads": threads, "backend_requested": args.backend, **info}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    too_large = HTTPException(
        413, f"the request body is larger than this service's limit of {limit:,} bytes; "
        "send a shorter context or split the questions over several requests",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(body: bytes):
    if not body.strip():
        raise HTTPException(400, f"the request body is empty; send {REQUEST_SHAPE}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HTTPException(
            400, f"the request body is not UTF-8 text (byte {body[error.start]:#04x} at offset {error.start}); "
            "send JSON encoded as UTF-8",
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise HTTPException(
            400, f"the request body is not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); "
            f"send {REQUEST_SHAPE}",
        ) from None
    except RecursionError:
        raise HTTPException(400, f"the request body nests JSON arrays or objects too deeply; send {REQUEST_SHAPE}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise HTTPException(400, f"the request body holds a number too long to read; send {REQUEST_SHAPE}") from None


def busy(retry_after_s: int, why: str) -> HTTPException:
    return HTTPException(
        503, f"the service is busy ({why}); try again in {retry_after_s} s", headers={"Retry-After": str(retry_after_s)}
    )


UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="qa"'}
ERROR_RESPONSES = {
    400: {"description": "The body is not JSON (empty, not UTF-8, malformed, nested too deeply)."},
    401: {
        "description": "No valid bearer token: send `Authorization: Bearer TOKEN`.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    },
    413: {"description": "The body is over the byte limit, or its questions need more model windows than the "
                         "per-request budget (see /v1/model): send shorter documents or fewer questions."},
    422: {"description": "JSON that does not match the request schema; the message names each field to fix."},
    503: {
        "description": "Busy: the model's queue is full, or the answer did not come within the deadline.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}},
    },
    500: {"description": "The service failed; the request may be retried."},
}


def error_responses(*codes: int) -> dict:
    return {code: {**ERROR_RESPONSES[code], "model": ErrorResponse} for code in codes}


# @serve.ingress freezes a copy of this app, with the globals its routes use, when the ingress
# class is defined: everything the routes call must be defined above that class. The schema and
# the docs page are routes of the class, so that the schema carries this deployment's limits.
api = FastAPI(
    title="Extractive question answering",
    description="Answers a question with a span of the given document (context). The page at `/` is a small UI. "
    "Every `/v1/` route needs `Authorization: Bearer TOKEN`.",
    version="1",
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)
api.middleware("http")(audit.audit_requests)


@api.exception_handler(HTTPException)
async def _error_as_json(request: Request, error: HTTPException) -> JSONResponse:
    message = error.detail
    if error.status_code == 404:
        message = f"no such path {request.url.path!r}; the API is described at /docs"
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


@api.exception_handler(Exception)
async def _crash_as_json(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(
        {"error": f"the service failed to answer ({type(error).__name__}); try again, or see the Serve logs"},
        status_code=500,
    )


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class QAIngress:
    """The HTTP side: the page, tokens, validation, budgets, and ``QAModel.answer`` calls per question."""

    def __init__(self, model: DeploymentHandle, args: ServeArgs, model_path: str, qa_config: QAConfig,
                 model_card: dict, token_hashes: list[str]):
        self.model = model
        self.args = args
        self.qa_config = qa_config
        self.tokenizer = load_tokenizer(model_path)
        self.model_card = model_card
        self.tokens = TokenChecker(token_hashes) if token_hashes else None
        self.log = audit.configure(args.audit_log, model_card["version"])
        self.index_html = INDEX_PAGE.read_text(encoding="utf-8")
        self.openapi_schema = None

    def authenticate(self, request: Request) -> None:
        """Record the caller's token id for the audit, or refuse the request with 401."""
        if self.tokens is None:
            return
        authorization = request.headers.get("authorization")
        token_id = self.tokens.token_id(authorization)
        if token_id is None:
            problem = "this token is not accepted" if authorization else "no bearer token"
            challenge = 'Bearer realm="qa", error="invalid_token"' if authorization else UNAUTHORIZED["WWW-Authenticate"]
            raise HTTPException(
                401, f"{problem}; send the header `Authorization: Bearer TOKEN` with a token this service accepts",
                headers={"WWW-Authenticate": challenge},
            )
        request.state.audit["token_id"] = token_id

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return self.index_html

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        if self.openapi_schema is None:
            schema = json.loads(json.dumps(request.app.openapi()))  # a copy: the app caches its own
            schema["paths"]["/v1/answer"]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": request_body_schema(self.args.max_context_chars)}},
            }
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            self.openapi_schema = schema
        return self.openapi_schema

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root_path = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root_path}/openapi.json", title=f"{api.title} - API docs")

    @api.get("/healthz", summary="The service is up (does not wake a model scaled to zero)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get(
        "/v1/model", summary="The model being served, its settings and limits (does not wake a model at zero)",
        responses=error_responses(401, 500), openapi_extra={"security": [{"bearer": []}]},
    )
    async def model_info(self, request: Request) -> dict:
        self.authenticate(request)
        return self.model_card

    @api.post(
        "/v1/answer",
        response_model=AnswerResponse,
        summary="Answer one question, or a list of questions, about a context",
        description=f"Body: {REQUEST_SHAPE}. Each answer is {{answer, score, start, end, no_answer_probability}} "
        "with context[start:end] == answer; 'not in this document' is answer \"\" with start = end = -1. "
        "top_k > 1 gives a list of answers per question, the no-answer one in its ranked place.",
        responses=error_responses(400, 401, 413, 422, 503, 500),
        openapi_extra={"security": [{"bearer": []}]},
    )
    async def answer(self, request: Request):
        self.authenticate(request)
        deadline = time.time() + self.args.request_deadline_s
        payload = decode_json(await read_body(request, self.args.max_body_bytes))
        try:
            questions, is_list = parse_questions(payload, max_context_chars=self.args.max_context_chars)
        except InvalidRequest as error:
            raise HTTPException(422, str(error)) from None
        windows = await asyncio.to_thread(
            count_windows, self.tokenizer, [q.question for q in questions], [q.context for q in questions],
            self.qa_config,
        )
        request.state.audit.update(questions=len(questions), windows=sum(windows))
        if sum(windows) > self.args.max_windows_per_request:
            raise HTTPException(
                413, f"these {len(questions)} question(s) need {sum(windows):,} model windows, more than this "
                f"service's limit of {self.args.max_windows_per_request:,} per request; send shorter documents "
                "or fewer questions per request",
            )
        self.log.questions.inc(len(questions))
        items = [
            WorkItem(Question(q.question, q.context, q.top_k, q.max_answer_length, q.allow_no_answer), count, deadline)
            for q, count in zip(questions, windows)
        ]
        results = await self.ask_model(items, deadline)
        request.state.audit["abstained"] = sum(answers[0]["answer"] == "" for answers in results)
        shaped = [answers if q.top_k > 1 else answers[0] for q, answers in zip(questions, results)]
        return shaped if is_list else shaped[0]

    async def ask_model(self, items: list[WorkItem], deadline: float) -> list[list[dict]]:
        """Every item's answers, or the HTTP error of the first item that has none."""
        tasks = [asyncio.ensure_future(self.ask_with_one_retry(item)) for item in items]
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(0.0, deadline - time.time()))
        except (asyncio.TimeoutError, BackPressureError, RayActorError) as error:
            for task in tasks:
                task.cancel()
            reason, why = {
                asyncio.TimeoutError: ("deadline", "no answer within the deadline"),
                BackPressureError: ("queue_full", "the model's queue is full"),
            }.get(type(error), ("replica_lost", "the model replica stopped"))
            self.log.rejections.inc(tags={"reason": reason})
            raise busy(self.args.retry_after_s, why) from None
        for position, outcome in enumerate(outcomes):
            if outcome.get("error") == DEADLINE:
                self.log.rejections.inc(tags={"reason": "deadline"})
                raise busy(self.args.retry_after_s, "no answer within the deadline")
            if "error" in outcome:
                raise HTTPException(500, f"the model failed on question {position} ({outcome['type']}); try again")
        return [outcome["answers"] for outcome in outcomes]

    async def ask_with_one_retry(self, item: WorkItem) -> dict:
        """Answering is idempotent: when the replica dies under the question, ask once more (within the deadline)."""
        for attempt in (1, 2):
            response = self.model.answer.remote(item)
            try:
                return await response
            except asyncio.CancelledError:
                response.cancel()
                raise
            except RayActorError:
                if attempt == 2 or time.time() >= item.deadline:
                    raise


def model_version(model_path: str) -> str:
    """A short id of the checkpoint: its config and its weight files' names, sizes and times."""
    directory = Path(model_path)
    if not directory.is_dir():
        return f"hub:{model_path}"
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for weights in sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")]):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def model_name(model: str, model_path: str) -> str:
    """What /v1/model calls the model: a Hub name as given; for a directory its name, never its path."""
    if not Path(model).expanduser().exists():
        return model
    directory = Path(model_path)
    return directory.parent.name if directory.name == "model" else directory.name  # runs/quickstart/model: quickstart


def model_card(model_path: str, args: ServeArgs, qa_config: QAConfig, model_options: dict) -> dict:
    """What /v1/model shows: the model's name and version, its settings and the request limits."""
    actor_options = model_options.get("ray_actor_options", {})
    device = "cuda" if actor_options.get("num_gpus", 0) else "cpu"
    backend = resolve_backend(model_path, args.backend, device=device, max_f1_loss=args.max_f1_loss)
    return {
        "name": args.model_name or model_name(args.model, model_path),
        "version": model_version(model_path),
        "device": device,
        "backend": backend,
        "backend_requested": args.backend,
        "dtype": {"onnx": "float32", "onnx-int8": "int8"}.get(backend) or dtype_name(args.dtype, device),
        "threads": max(1, int(actor_options.get("num_cpus", 1))),  # intra-op threads: one per CPU of a replica
        **qa_config.to_dict(),
        "max_batch_size": args.max_batch_size,
        "limits": {
            "questions_per_request": MAX_QUESTIONS_PER_REQUEST,
            "question_chars": MAX_QUESTION_CHARS,
            "context_chars": args.max_context_chars,
            "body_bytes": args.max_body_bytes,
            "windows_per_request": args.max_windows_per_request,
            "deadline_s": args.request_deadline_s,
        },
    }


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


def deployment_options(app_config: dict) -> dict[str, dict]:
    """``{deployment name: .options() keyword arguments}`` from an application's ``deployments`` list."""
    options = {}
    for entry in app_config.get("deployments", []):
        entry = dict(entry)
        name = entry.pop("name", None)
        if name not in (INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT):
            raise ValueError(
                f"the config names deployment {name!r}; this application has {INGRESS_DEPLOYMENT} and {MODEL_DEPLOYMENT}"
            )
        options[name] = entry
    return options


def check_authentication(args: ServeArgs, bind_host: str | None) -> list[str]:
    """The accepted tokens' hashes; refuses (ValueError) to serve without them except on loopback or when told.

    ``bind_host`` is the HTTP host the service listens on, None when unknown (``serve run``/``deploy``
    of a config file): unknown counts as reachable from other machines.
    """
    hashes = load_token_hashes(args.token_hashes_file)
    if hashes:
        return hashes
    where = f"on {bind_host}" if bind_host else "where other machines may reach it"
    if args.insecure_no_auth:
        logger.warning("serving WITHOUT authentication %s (insecure_no_auth): anyone who reaches it may send "
                       "documents; never do this with patient data", where)
    elif bind_host is not None and is_loopback(bind_host):
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


def build_app(args: ServeArgs | dict, options: dict[str, dict], *, bind_host: str | None = None) -> Application:
    """The application for ``args`` and deployment ``options``; ``bind_host``: see check_authentication."""
    args = ServeArgs.model_validate(args)
    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; train one with `python -m train_job`, or pass another model directory (--model / args.model)"
        ) from None
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
    token_hashes = check_authentication(args, bind_host)
    model = QAModel.options(**model_options).bind(model_path, qa_config, args)
    card = model_card(model_path, args, qa_config, model_options)
    return QAIngress.options(**ingress_options).bind(model, args, model_path, qa_config, card, token_hashes)


def app_builder(args: dict) -> Application:
    """Entry point of ``serve run``/``serve deploy`` (``import_path: serve_app.app:app_builder``).

    The packaged ``config.yaml`` gives the defaults: its ``args`` under ``args``, its deployment
    options (a config file being deployed then overrides them with its own ``deployments``).
    """
    [packaged] = load_serve_config()["applications"]
    return build_app({**packaged.get("args", {}), **args}, deployment_options(packaged))


def run_config(config: dict, *, ray_address: str = "local") -> str:
    """Build the config's application, start Serve with its HTTP options and run it; return its URL.

    Connects to Ray at ``ray_address`` (``local``: a new local instance) unless already connected.
    Returns once the application is running.
    """
    [app_config] = config["applications"]
    http_options = dict(config.get("http_options") or {})
    host = http_options.get("host", "127.0.0.1")
    # Fails before starting anything.
    app = build_app(app_config.get("args", {}), deployment_options(app_config), bind_host=host)
    if not ray.is_initialized():
        if ray_address == "local":
            request_ids.set_proxy_environment()  # the proxies we start drop unsafe client request ids
        ray.init(address=ray_address)
    serve.start(http_options=http_options)
    route_prefix = app_config.get("route_prefix", "/")
    serve.run(app, name=app_config["name"], route_prefix=route_prefix)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown_host}:{http_options.get('port', 8000)}{route_prefix}"
