"""The Ray Serve application: a light FastAPI ingress in front of a batched, autoscaled QA model.

- ``QAIngress`` (one small replica that never scales to zero) serves the web page, validates
  requests and fans each question out to the model deployment through a ``DeploymentHandle``.
- ``QAModel`` holds the model. Its ``answer`` method takes one question, and ``@serve.batch``
  gathers concurrent questions so that each batch is ONE ``qa_common.answer_questions`` call
  (a "model call", counted in ``describe()``). It may scale to zero; a request arriving then waits
  in the handle's queue for the cold start.

Deployment options (replicas, autoscaling, CPUs/GPUs) are data: ``config.yaml`` next to this file.
"""

import asyncio
import hashlib
import json
from pathlib import Path

import ray
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from qa_common import (
    QAConfig, Question, answer_questions, load_model_and_tokenizer, load_qa_config, resolve_model_path,
)
from qa_common.modeling import torch_dtype
from serve_app.schemas import (
    REQUEST_SHAPE, AnswerRequest, AnswerResponse, InvalidRequest, ServeArgs, parse_questions,
)

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
INDEX_PAGE = Path(__file__).with_name("static") / "index.html"
INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT = "QAIngress", "QAModel"  # the deployments' names, as in config.yaml


@serve.deployment(name=MODEL_DEPLOYMENT)
class QAModel:
    """One copy of the model; answers questions in dynamic batches."""

    def __init__(self, model_path: str, qa_config: QAConfig, args: ServeArgs):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        dtype = torch_dtype(args.dtype, device)
        model, self.tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
        self.model = model.to(device).eval()
        self.qa_config = qa_config
        self.forward_batch_size = args.forward_batch_size
        self.answer.set_max_batch_size(args.max_batch_size)
        self.answer.set_batch_wait_timeout_s(args.batch_wait_timeout_s)
        self.model_calls = 0
        self.info = {
            "model": model_path,
            "name_or_path": model.config.name_or_path,
            "version": model_version(model_path),
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            **qa_config.to_dict(),
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
        }

    @serve.batch
    async def answer(self, questions: list[Question]) -> list[list[dict]]:
        self.model_calls += 1
        # In a thread, so the replica keeps queueing the next batch while the model runs.
        return await asyncio.to_thread(
            answer_questions, self.model, self.tokenizer, questions, self.qa_config,
            batch_size=self.forward_batch_size,
        )

    def describe(self) -> dict:
        """What this replica serves, and how many model calls (batches) it has run."""
        return {**self.info, "model_calls": self.model_calls}


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


# @serve.ingress freezes a copy of this app, with the globals its routes use, when the ingress
# class is defined: everything the routes call must be defined above that class.
api = FastAPI(
    title="Extractive question answering",
    description="Answers a question with a span of the given document (context). The page at `/` is a small UI.",
    version="1",
)


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
    """The HTTP side: the page, validation, and one ``QAModel.answer`` call per question."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int, max_context_chars: int):
        self.model = model
        self.max_body_bytes = max_body_bytes
        self.max_context_chars = max_context_chars
        self.index_html = INDEX_PAGE.read_text(encoding="utf-8")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return self.index_html

    @api.get("/healthz", summary="The service is up (does not wake a model scaled to zero)")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model", summary="The model being served and its settings (starts a model replica if none runs)")
    async def model_info(self) -> dict:
        return await self.model.describe.remote()

    @api.post(
        "/v1/answer",
        response_model=AnswerResponse,
        summary="Answer one question, or a list of questions, about a context",
        description=f"Body: {REQUEST_SHAPE}. Each answer is {{answer, score, start, end, no_answer_probability}} "
        "with context[start:end] == answer; 'not in this document' is answer \"\" with start = end = -1. "
        "top_k > 1 gives a list of answers per question, the no-answer one in its ranked place.",
        # The body is read by hand (size cap, UTF-8, JSON, then validation); describe it for /docs.
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
            "anyOf": [AnswerRequest.model_json_schema(), {"type": "array", "items": AnswerRequest.model_json_schema()}]
        }}}}},
    )
    async def answer(self, request: Request):
        payload = decode_json(await read_body(request, self.max_body_bytes))
        try:
            questions, is_list = parse_questions(payload, max_context_chars=self.max_context_chars)
        except InvalidRequest as error:
            raise HTTPException(422, str(error)) from None
        results = await asyncio.gather(*(
            self.model.answer.remote(Question(q.question, q.context, q.top_k, q.max_answer_length, q.allow_no_answer))
            for q in questions
        ))
        shaped = [answers if q.top_k > 1 else answers[0] for q, answers in zip(questions, results)]
        return shaped if is_list else shaped[0]


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


def build_app(args: ServeArgs | dict, options: dict[str, dict]) -> Application:
    args = ServeArgs.model_validate(args)
    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{error}; train one with `python -m train_job`, or pass another model directory (--model / args.model)"
        ) from None
    qa_config = resolve_qa_config(model_path, args)
    model_options, ingress_options = options.get(MODEL_DEPLOYMENT, {}), options.get(INGRESS_DEPLOYMENT, {})
    max_ongoing = model_options.get("max_ongoing_requests", 5)  # Serve's default
    if max_ongoing < args.max_batch_size:
        raise ValueError(
            f"QAModel max_ongoing_requests ({max_ongoing}) is below max_batch_size ({args.max_batch_size}): a replica "
            "never holds more requests than that at once, so its batches could not fill; raise it"
        )
    model = QAModel.options(**model_options).bind(model_path, qa_config, args)
    return QAIngress.options(**ingress_options).bind(model, args.max_body_bytes, args.max_context_chars)


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
    app = build_app(app_config.get("args", {}), deployment_options(app_config))  # fails before starting anything
    if not ray.is_initialized():
        ray.init(address=ray_address)
    http_options = dict(config.get("http_options") or {})
    serve.start(http_options=http_options)
    route_prefix = app_config.get("route_prefix", "/")
    serve.run(app, name=app_config["name"], route_prefix=route_prefix)
    host = http_options.get("host", "127.0.0.1")
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown_host}:{http_options.get('port', 8000)}{route_prefix}"
