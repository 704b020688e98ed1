"""``Retriever``, the Ray Serve deployment that searches the document library for ``/v1/ask``.

It holds the index (:class:`qa_common.library.search.Library`: LanceDB tables opened from disk, so a
replica's memory is the embedder and Lance's caches: the passages' text stays on disk, their vectors
are held once searched, 1.5 KiB each, about 8 KiB a passage) and the sentence embedder the index
was built with. Before each search it checks whether a build has published a newer
version and moves to it, so a rebuilt library is served without a restart. It scales to zero like
the model; its health check embeds and searches once.
"""

import asyncio
import threading

import ray
from ray import serve

from qa_common.library.embedding import Embedder
from qa_common.library.search import Library

RETRIEVER_DEPLOYMENT = "Retriever"  # the deployment's name, as in config.yaml


# Its options live here rather than in config.yaml, which serves applications without a library too
# (Serve refuses a config entry for a deployment an application does not have); a config entry
# `- name: Retriever` overrides them key by key, as Serve does.
RETRIEVER_OPTIONS = {
    "max_ongoing_requests": 16,
    "max_queued_requests": 64,  # beyond: 503 with Retry-After
    "max_surge_percent": 50,
    "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                           "upscale_delay_s": 5, "downscale_delay_s": 300, "downscale_to_zero_delay_s": 3600},
    "ray_actor_options": {"num_cpus": 1},
}


@serve.deployment(name=RETRIEVER_DEPLOYMENT, **RETRIEVER_OPTIONS)
class Retriever:
    def __init__(self, library: str):
        threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.library = Library(library)
        self.embedder = Embedder(self.library.manifest.embedder, threads=threads)
        self.lock = threading.Lock()  # one search at a time: a refresh swaps the open version

    def _search(self, question: str, k: int, collection: str | None, document: str | None) -> dict:
        with self.lock:
            self.library.refresh()
            vector = self.embedder.embed([question])[0]
            hits = self.library.search(question, vector, k, collection=collection, document=document)
        return {"version": self.library.version, "passages": [{**hit.passage, "retrieval_score": hit.score}
                                                              for hit in hits]}

    async def search(self, question: str, k: int, collection: str | None = None, document: str | None = None) -> dict:
        """``{"version": index version, "passages": [passage columns + retrieval_score, best first]}``."""
        return await asyncio.to_thread(self._search, question, k, collection, document)

    async def check_health(self) -> None:
        await asyncio.to_thread(self._search, "health check", 1, None, None)
