"""``FeedbackKeeper``, the one Ray Serve deployment that writes the feedback store.

SQLite takes one writer, so the keeper runs as exactly one replica (no CPU reserved: it writes a
row now and then) and never scales to zero: feedback is rare, and a cold start would hold a
clinician's click. It checks each rating against its receipt (:mod:`serve_app.feedback.request`),
reads a library answer's passages from the library by their ids, and stores the record durably
before it answers.
"""

import asyncio
import threading

from ray import serve

from qa_common.library.search import Library
from serve_app.feedback.receipts import ReceiptError, load_or_create_key
from serve_app.feedback.request import FeedbackRequest, PassagesGone, feedback_from
from serve_app.feedback.store import FeedbackError, FeedbackStore

FEEDBACK_DEPLOYMENT = "FeedbackKeeper"  # the deployment's name
# Its options live here, as the Retriever's do (config.yaml also serves applications without
# feedback); a config entry `- name: FeedbackKeeper` overrides them key by key, except the one replica.
FEEDBACK_OPTIONS = {
    "num_replicas": 1,
    "max_ongoing_requests": 16,
    "max_queued_requests": 64,  # beyond: 503 with Retry-After
    "ray_actor_options": {"num_cpus": 0},
}


@serve.deployment(name=FEEDBACK_DEPLOYMENT, **FEEDBACK_OPTIONS)
class FeedbackKeeper:
    def __init__(self, folder: str, library: str | None):
        self.key = load_or_create_key(folder)
        self.store = FeedbackStore(folder)
        self.library = Library(library) if library else None
        self.lock = threading.Lock()  # one connection, one writer

    def _record(self, request: FeedbackRequest, token_id: str | None) -> dict:
        with self.lock:
            try:
                feedback = feedback_from(request, self.key, token_id, self._passages if self.library else None)
            except ReceiptError as error:
                return {"status": 403, "error": str(error)}
            except FeedbackError as error:
                return {"status": 422, "error": str(error)}
            except PassagesGone as error:
                return {"status": 409, "error": f"{error}; ask again and rate the new answer"}
            feedback_id, created = self.store.add(feedback)
            return {"status": 201 if created else 200, "feedback_id": feedback_id, "created": created,
                    "model_version": feedback.model_version, "verdict": feedback.verdict}

    def _passages(self, ids) -> list[dict]:
        self.library.refresh()
        return self.library.passages(ids)

    async def record(self, request: FeedbackRequest, token_id: str | None) -> dict:
        """``{"status": 201 (stored) or 200 (stored before), "feedback_id", "created", "model_version",
        "verdict"}``, or ``{"status": 4xx, "error"}`` naming what to fix (never the text)."""
        return await asyncio.to_thread(self._record, request, token_id)
