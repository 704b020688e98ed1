"""The ingress's calls to the other deployments: the model, the library's retriever, the feedback store.

Each call runs within the request's deadline; one that is late, queued out (the deployment's
queue is full) or whose replica is lost becomes a 503 with Retry-After, counted by reason.
Answering is idempotent, so a question whose model replica dies under it is asked again once.
"""

import asyncio
import time

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve_app.http import busy
from serve_app.work import DEADLINE, WorkItem

TURNED_AWAY = (asyncio.TimeoutError, BackPressureError, RayActorError)  # a call's failures that are a 503


class DeploymentCalls:
    """The handles the ingress holds, and what each call does when the deployment cannot answer in time."""

    def __init__(self, model: DeploymentHandle, retriever: DeploymentHandle | None,
                 feedback: DeploymentHandle | None, rejections, retry_after_s: int):
        self.model = model
        self.retriever = retriever
        self.feedback = feedback
        self.rejections = rejections  # the counter of 503s, tagged by reason
        self.retry_after_s = retry_after_s

    def turned_away(self, error: Exception, what: str) -> HTTPException:
        """The 503 for a call to the ``what`` deployment that was too late, queued out or lost (counted)."""
        reason, why = {
            asyncio.TimeoutError: ("deadline", "no answer within the deadline"),
            BackPressureError: ("queue_full", f"the {what}'s queue is full"),
        }.get(type(error), ("replica_lost", f"the {what} replica stopped"))
        self.rejections.inc(tags={"reason": reason})
        return busy(self.retry_after_s, why)

    async def within(self, call, deadline: float, what: str):
        """``call``'s result, or the 503 of :meth:`turned_away` (the call cancelled) past ``deadline``."""
        try:
            return await asyncio.wait_for(call, timeout=max(0.0, deadline - time.time()))
        except TURNED_AWAY as error:
            call.cancel()
            raise self.turned_away(error, what) from None

    async def search(self, question: str, passages: int, collection, document, deadline: float) -> dict:
        """The retriever's ``passages`` best passages for ``question``."""
        return await self.within(self.retriever.search.remote(question, passages, collection, document),
                                 deadline, "library")

    async def record(self, rating, token_id: str, deadline: float) -> dict:
        """The feedback store's outcome of storing ``rating`` from ``token_id``."""
        return await self.within(self.feedback.record.remote(rating, token_id), deadline, "feedback store")

    async def answers(self, items: list[WorkItem], deadline: float) -> list[dict]:
        """Every item's outcome (``{"answers", "model_version", ...}``: ``QAModel.answer``), or the HTTP
        error of the first item that has none."""
        tasks = [asyncio.ensure_future(self.ask_with_one_retry(item)) for item in items]
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(0.0, deadline - time.time()))
        except TURNED_AWAY as error:
            for task in tasks:
                task.cancel()
            raise self.turned_away(error, "model") from None
        for position, outcome in enumerate(outcomes):
            if outcome.get("error") == DEADLINE:  # the replica saw the deadline pass: the same 503 as ours
                raise self.turned_away(asyncio.TimeoutError(), "model")
            if "error" in outcome:
                raise HTTPException(500, f"the model failed on question {position} ({outcome['type']}); try again")
        return outcomes

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
