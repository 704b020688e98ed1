"""``QAModel``, the Ray Serve deployment that holds the model.

Its ``answer`` method takes one question, and ``@serve.batch`` gathers concurrent questions; each
batch runs as ``qa_common.read_questions`` calls of at most ``max_windows_per_call`` windows (a
"model call", counted in ``describe()``), with the deadline checked between calls. It may scale to
zero; a request arriving then waits in the handle's queue for the cold start. ``check_health`` runs
a tiny forward pass, so a replica that cannot run the model is replaced. Every outcome names the
model version that made it, so that during an update (old and new replicas side by side) each
response says which model answered.
"""

import asyncio
import time

import ray
from ray import serve
from ray.serve.metrics import Histogram

from qa_common import QAConfig, Question, answer_questions, read_questions
from qa_common.backends import load_runner
from qa_common.modeling import torch_dtype
from serve_app.settings import ServeArgs
from serve_app.snapshot import version_of
from serve_app.work import WorkItem, answer_in_chunks

MODEL_DEPLOYMENT = "QAModel"  # the deployment's name, as in config.yaml
HEALTH_PROBE = Question("Is the model able to run?", "The model runs.")


@serve.deployment(name=MODEL_DEPLOYMENT)
class QAModel:
    """One copy of the model; answers questions in dynamic batches, within a window budget per call."""

    def __init__(self, model_path: str, qa_config: QAConfig, args: ServeArgs):
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        threads = args.replica_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        self.runner, self.tokenizer, self.backend = load_model(model_path, args, device=self.device, threads=threads)
        self.qa_config = qa_config
        self.version = version_of(model_path)
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
        """Per item ``{"answers": [...]}`` (a library question's with its ``passage_order``), or ``{"error":
        ...}`` for that item alone (see serve_app.work), with this replica's ``model_version``."""
        self.batch_questions.observe(len(items))
        outcomes = await answer_in_chunks(items, self.max_windows_per_call, self.model_call)
        return [{**outcome, "model_version": self.version} for outcome in outcomes]

    async def model_call(self, items: list[WorkItem]) -> list[dict]:
        self.model_calls += 1
        started = time.perf_counter()
        # In a thread, so the replica keeps queueing the next batch while the model runs.
        read = await asyncio.to_thread(
            read_questions, self.runner, self.tokenizer, [item.question for item in items], self.qa_config,
            batch_size=self.forward_batch_size,
        )
        self.call_seconds.observe(time.perf_counter() - started)
        self.call_windows.observe(sum(item.windows for item in items))
        return read

    async def check_health(self) -> None:
        """Serve's health check: a replica that cannot run a forward pass raises, and is replaced."""
        await asyncio.to_thread(answer_questions, self.runner, self.tokenizer, [HEALTH_PROBE], self.qa_config)

    def describe(self) -> dict:
        """How many model calls this replica has run, and where (for operators and tests)."""
        return {"model_calls": self.model_calls, "device": self.device, "model_version": self.version, **self.backend}


def load_model(model_path: str, args: ServeArgs, *, device: str, threads: int) -> tuple:
    """``(runner, tokenizer, info)`` of a replica: ``args.backend`` (``auto`` reads the model's
    onnx_export.json) on ``device``, with ``threads`` intra-op threads (``ServeArgs.replica_threads``)."""
    runner, tokenizer, info = load_runner(model_path, args.backend, device=device, dtype=torch_dtype(args.dtype, device),
                                          threads=threads, max_f1_loss=args.max_f1_loss)
    return runner, tokenizer, {"backend_requested": args.backend, **info}
