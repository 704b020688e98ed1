"""``QAIngress``, the HTTP side of the service (one small replica that never scales to zero).

It serves the web page, checks the bearer token, validates requests, counts the model windows each
needs (413 over the budget) and fans each question out to the model deployment
(:class:`serve_app.calls.DeploymentCalls`: within a per-request deadline, 503 with Retry-After beyond
it or when a queue is full, a question whose model replica dies under it asked again once). Every
request leaves one JSON line in the audit log (ids, sizes, times, statuses; never text), and every
answer response names the model version that made it (``X-Model-Version``).
"""

import asyncio
import json
import time

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from qa_common import NO_ANSWER, PassagesQuestion, QAConfig, Question, count_windows, load_tokenizer
from serve_app import audit, pages
from serve_app.feedback.receipts import MAX_RECEIPTS_HEADER, RECEIPT_HEADER, issue, load_or_create_key
from serve_app.feedback.request import FEEDBACK_SHAPE, parse_feedback
from serve_app.auth import TokenChecker
from serve_app.calls import DeploymentCalls
from serve_app.library_answers import NO_LIBRARY, cite, served_manifest, source
from serve_app.http import UNAUTHORIZED, crash_as_json, decode_json, error_as_json, error_responses, read_body
from serve_app.schemas import (
    ASK_SHAPE, REQUEST_SHAPE, AnswerResponse, AskResponse,
    InvalidRequest, parse_ask, parse_questions, request_body_schema,
)
from serve_app.settings import ServeArgs
from serve_app.work import WorkItem

INGRESS_DEPLOYMENT = "QAIngress"  # the deployment's name, as in config.yaml
MODEL_VERSION_HEADER = "X-Model-Version"
NO_FEEDBACK = "this service keeps no feedback: start it with --feedback DIR (a folder for the feedback store)"


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
api.exception_handler(HTTPException)(error_as_json)
api.exception_handler(Exception)(crash_as_json)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class QAIngress:
    """The HTTP side: the page, tokens, validation, budgets, and ``QAModel.answer`` calls per question."""

    def __init__(self, model: DeploymentHandle, args: ServeArgs, model_path: str, qa_config: QAConfig,
                 model_card: dict, token_hashes: list[str], deployed: dict | None = None,
                 retriever: DeploymentHandle | None = None, feedback: DeploymentHandle | None = None):
        self.receipt_key = load_or_create_key(args.feedback) if feedback is not None else None
        self.deployed = deployed
        self.args = args
        self.qa_config = qa_config
        self.tokenizer = load_tokenizer(model_path)
        self.model_card = model_card
        self.tokens = TokenChecker(token_hashes) if token_hashes else None
        self.log = audit.configure(args.audit_log, model_card["version"])
        self.calls = DeploymentCalls(model, retriever, feedback, self.log.rejections, args.retry_after_s)
        self.index_html = pages.INDEX_PAGE.read_text(encoding="utf-8")
        self.docs_assets = pages.load_docs_assets()
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

    def deployed_config(self) -> dict | None:
        """For ``python -m serve_app update`` (through a handle, never over HTTP: it holds server paths):
        this application's Serve config entry and HTTP host as deployed, None when it was deployed from
        a config file (``serve deploy``, a RayService), which is where an update then belongs."""
        return self.deployed

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return pages.html_page(self.index_html)

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
        return pages.docs_page(request.scope.get("root_path", "").rstrip("/"), f"{api.title} - API docs")

    @api.get(pages.DOCS_ASSETS_ROUTE + "/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> Response:
        asset = pages.docs_asset(self.docs_assets, name)
        if asset is None:
            raise HTTPException(404, "no such file of the API docs")
        return asset

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
        "top_k > 1 gives a list of answers per question, the no-answer one in its ranked place. The "
        f"`{MODEL_VERSION_HEADER}` header names the model version that answered (during an update, "
        "comma-separated when the questions of one request were answered by both).",
        responses=error_responses(400, 401, 413, 422, 503, 500),
        openapi_extra={"security": [{"bearer": []}]},
    )
    async def answer(self, request: Request, response: Response):
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
        outcomes = await self.calls.answers(items, deadline)
        results = [outcome["answers"] for outcome in outcomes]
        versions = [outcome["model_version"] for outcome in outcomes]
        response.headers[MODEL_VERSION_HEADER] = request.state.audit["model_version"] = ",".join(sorted(set(versions)))
        request.state.audit["abstained"] = sum(answers[0]["answer"] == "" for answers in results)
        if self.receipt_key is not None:
            receipts = ",".join(issue(self.receipt_key, "answer", version, None, q.question, [q.context], answers)
                                for q, answers, version in zip(questions, results, versions))
            if len(receipts) <= MAX_RECEIPTS_HEADER:  # beyond, clients' header limits (16 KiB in h11) bite
                response.headers[RECEIPT_HEADER] = receipts
        shaped = [answers if q.top_k > 1 else answers[0] for q, answers in zip(questions, results)]
        return shaped if is_list else shaped[0]

    @api.get(
        "/v1/collections", summary="What the document library holds (does not wake the retriever at zero)",
        responses=error_responses(401, 404, 500), openapi_extra={"security": [{"bearer": []}]},
    )
    async def collections(self, request: Request) -> dict:
        self.authenticate(request)
        manifest = await asyncio.to_thread(served_manifest, self.args.library)
        return {"index_version": manifest.version, "built_at": manifest.built_at, "collections": manifest.summary()}

    @api.post(
        "/v1/ask",
        response_model=AskResponse,
        summary="Ask the document library: the passages retrieved are read together and cited",
        description=f"Body: {ASK_SHAPE}. The library's best passages (hybrid search) are read as one candidate "
        "set, so scores compare across documents. Each answer cites its document, page, section and passage; "
        "start and end are offsets into `passage`. 'Not in these documents' is answer \"\" with start = end = -1 "
        "and no citation. `sources` lists every passage read, where the reader found an answer most strongly "
        f"first. `{MODEL_VERSION_HEADER}` names the model version that answered.",
        responses=error_responses(400, 401, 404, 413, 422, 503, 500),
        openapi_extra={"security": [{"bearer": []}]},
    )
    async def ask(self, request: Request, response: Response):
        self.authenticate(request)
        if self.calls.retriever is None:
            raise HTTPException(404, NO_LIBRARY)
        deadline = time.time() + self.args.request_deadline_s
        payload = decode_json(await read_body(request, self.args.max_body_bytes))
        try:
            ask = parse_ask(payload)
        except InvalidRequest as error:
            raise HTTPException(422, str(error)) from None
        found = await self.calls.search(ask.question, ask.passages or self.args.passages, ask.collection,
                                       ask.document, deadline)
        passages = found["passages"]
        texts = tuple(passage["text"] for passage in passages)
        windows = await asyncio.to_thread(count_windows, self.tokenizer, [ask.question] * len(texts), list(texts),
                                          self.qa_config) if texts else []
        request.state.audit.update(questions=1, windows=sum(windows), passages=len(texts),
                                   index_version=found["version"])
        if sum(windows) > self.args.max_windows_per_request:
            raise HTTPException(413, f"the {len(texts)} passages need {sum(windows):,} model windows, more than this "
                                f"service's limit of {self.args.max_windows_per_request:,}; ask for fewer passages")
        self.log.questions.inc()
        if texts:
            item = WorkItem(PassagesQuestion(ask.question, texts, ask.top_k, ask.max_answer_length,
                                             ask.allow_no_answer), sum(windows), deadline)
            [outcome] = await self.calls.answers([item], deadline)
            answers, version, order = outcome["answers"], outcome["model_version"], outcome["passage_order"]
            response.headers[MODEL_VERSION_HEADER] = request.state.audit["model_version"] = version
            if self.receipt_key is not None:
                response.headers[RECEIPT_HEADER] = issue(self.receipt_key, "ask", version, found["version"],
                                                         ask.question, [p["passage_id"] for p in passages], answers)
        else:  # an empty library, or filters that match nothing: nothing to rate
            answers, order = [{**NO_ANSWER, "passage": -1}], []
        request.state.audit["abstained"] = int(answers[0]["answer"] == "")
        return {"answers": [cite(answer, passages) for answer in answers], "passages_read": len(texts),
                "sources": [source(passages[p]) for p in order], "index_version": found["version"]}

    @api.post(
        "/v1/feedback", status_code=201,
        summary="Rate an answer: right, wrong (with the right words, if you select them), or not in the documents",
        description=f"Body: {FEEDBACK_SHAPE}. 201 with the stored record's id; 200 when this key was stored before. "
        "The answer is named by the X-Response-Id its response carried; the question (and for /v1/answer the "
        "context) must be the ones asked. Stored where the operator keeps feedback; never logged.",
        responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503, 500),
        openapi_extra={"security": [{"bearer": []}]},
    )
    async def rate(self, request: Request, response: Response) -> dict:
        self.authenticate(request)
        if self.calls.feedback is None:
            raise HTTPException(404, NO_FEEDBACK)
        payload = decode_json(await read_body(request, self.args.max_body_bytes))
        try:
            rating = parse_feedback(payload)
        except InvalidRequest as error:
            raise HTTPException(422, str(error)) from None
        outcome = await self.calls.record(rating, request.state.audit["token_id"],
                                          time.time() + self.args.request_deadline_s)
        if "error" in outcome:
            raise HTTPException(outcome["status"], outcome["error"])
        request.state.audit.update(feedback_id=outcome["feedback_id"], verdict=outcome["verdict"],
                                   model_version=outcome["model_version"])
        if outcome["created"]:
            self.log.rated.inc(tags={"model_version": outcome["model_version"], "verdict": outcome["verdict"]})
        response.status_code = outcome["status"]
        return {"feedback_id": outcome["feedback_id"], "created": outcome["created"]}
