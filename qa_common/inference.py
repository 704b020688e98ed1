"""Answer questions with a loaded model: features -> one batched forward pass -> span decoding.

The same functions serve the HTTP service, the demos and evaluation, so an answer is decoded the
same way everywhere. Only the forward pass depends on the backend: a *runner* takes one batch of
numpy inputs (the tokenizer's ``input_ids``, ``attention_mask``, ``token_type_ids``; only the
names in its ``input_names``) and returns float32 start and end logits; its ``on_cpu`` says whether
it computes on a CPU (see :data:`MAX_PADDING`), its ``length_multiple`` what batch widths it takes.
:class:`TorchRunner` wraps a PyTorch model, :class:`OnnxRunner` an ONNX Runtime session (see
:mod:`qa_common.backends`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qa_common.config import QAConfig
from qa_common.decoding import decode_spans
from qa_common.passage_decoding import decode_passages, passage_order
from qa_common.features import LENGTH_MULTIPLE, MODEL_INPUTS, prepare_eval_features, trim_padding

# Windows per forward pass: on a CPU, larger batches gain nothing and hold more memory; a GPU wants more.
FORWARD_BATCH_SIZE = 64
FORWARD_BATCH_SIZE_GPU = 256
# On a CPU a forward batch also holds at most this many tokens (windows x its longest): attention's
# scores grow with rows x length², and batches of 64 windows of 256 tokens held 225-700 MiB more and
# ran 1.16-1.26x slower in every backend, their float32 score matrices out of cache (BENCHMARKS.md,
# "Forward batches of at most 4,096 tokens"). Short windows still fill a batch of 64.
CPU_BATCH_TOKENS = 4096
# On a CPU a forward batch ends before a window that would pad it by more than this share of its real
# tokens. A question's few passages differ widely in length (108 to 256 tokens for a dev question's
# eight): padded together, /v1/ask's reading took twice as long (BENCHMARKS.md). A GPU keeps whole
# batches: there a batch's time is mostly fixed at these sizes (not measured on one yet).
MAX_PADDING = 0.1


@dataclass(frozen=True)
class Question:
    question: str
    context: str
    top_k: int = 1
    max_answer_length: int | None = None  # None: the QAConfig's value
    allow_no_answer: bool | None = None  # may answer "not in this document"; None: QAConfig.version_2_with_negative


@dataclass(frozen=True)
class PassagesQuestion:
    """A question read over several passages at once (a library's retrieved passages): its answers
    are ranked across all of them and name their passage (:func:`qa_common.passage_decoding.decode_passages`)."""

    question: str
    passages: tuple[str, ...]
    top_k: int = 1
    max_answer_length: int | None = None
    allow_no_answer: bool | None = None


def contexts_of(question: Question | PassagesQuestion) -> tuple[str, ...]:
    return question.passages if isinstance(question, PassagesQuestion) else (question.context,)


class TorchRunner:
    """Start and end logits from a PyTorch QA model (on whatever device and dtype it is on)."""

    input_names = MODEL_INPUTS

    def __init__(self, model):
        self.model = model

    @property
    def on_cpu(self) -> bool:
        return next(self.model.parameters()).device.type == "cpu"

    @property
    def length_multiple(self) -> int:
        """Batches are cut to a multiple of this many tokens: on a CPU, few shapes keep glibc's heap
        from growing with every new length (:data:`qa_common.features.LENGTH_MULTIPLE`)."""
        return LENGTH_MULTIPLE if self.on_cpu else 1

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        device = next(self.model.parameters()).device
        with torch.inference_mode():
            outputs = self.model(**{name: torch.as_tensor(value, dtype=torch.long, device=device)
                                    for name, value in batch.items()})
        return outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()


class OnnxRunner:
    """Start and end logits from an ONNX Runtime session of a model written by ``qa_common.export_onnx``."""

    on_cpu = True  # onnxruntime's CPU build
    length_multiple = 1  # its own memory arena; padding to fewer shapes not measured for it

    def __init__(self, session):
        self.session = session
        self.input_names = tuple(node.name for node in session.get_inputs())

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.session.run(["start_logits", "end_logits"],
                                      {name: value.astype(np.int64, copy=False) for name, value in batch.items()})
        return start, end


def as_runner(model_or_runner):
    """A runner for ``model_or_runner``: a PyTorch module is wrapped in :class:`TorchRunner`, a runner kept."""
    import torch

    return TorchRunner(model_or_runner) if isinstance(model_or_runner, torch.nn.Module) else model_or_runner


def forward_batches(lengths: np.ndarray, batch_size: int, max_padding: float = MAX_PADDING,
                    max_tokens: float = math.inf) -> list[np.ndarray]:
    """Row indices in forward batches, shortest windows first: at most ``batch_size`` rows each, and a
    batch ends before a window that would make its padded tokens (rows x its longest) exceed its real
    tokens by more than ``max_padding``, or ``max_tokens`` (a window longer than that runs alone).
    Thousands of windows sorted by length still fill whole batches; a question's few windows of
    different lengths run in several small ones."""
    batches, current, real = [], [], 0
    for row in np.argsort(lengths, kind="stable"):
        length = int(lengths[row])
        padded = (len(current) + 1) * length
        if current and (len(current) == batch_size or padded > max_tokens or padded > (1 + max_padding) * (real + length)):
            batches.append(np.array(current))
            current, real = [], 0
        current.append(row)
        real += length
    if current:
        batches.append(np.array(current))
    return batches


def predict_logits(runner, features: dict, *, batch_size: int = FORWARD_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Start and end logits (float32, padded back to the features' length) for every feature.

    ``runner`` is a :class:`TorchRunner`, an :class:`OnnxRunner` or a PyTorch QA model. Features run
    in :func:`forward_batches` (shortest first, padding and tokens bounded on a CPU), each cut to its longest
    window by :func:`trim_padding`, rounded up to the runner's ``length_multiple``.
    """
    runner = as_runner(runner)
    names = [name for name in runner.input_names if name in features]
    count, length = features["input_ids"].shape
    start_logits = np.full((count, length), -np.inf, dtype=np.float32)
    end_logits = np.full((count, length), -np.inf, dtype=np.float32)
    max_padding, max_tokens = (MAX_PADDING, CPU_BATCH_TOKENS) if runner.on_cpu else (math.inf, math.inf)
    lengths = np.asarray(features["attention_mask"]).sum(axis=1)
    for rows in forward_batches(lengths, batch_size, max_padding, max_tokens):
        batch = trim_padding({name: np.asarray(features[name])[rows] for name in names},
                             multiple_of=runner.length_multiple)
        start, end = runner(batch)
        longest = int(lengths[rows].max())  # past it the batch holds only padding: its logits stay -inf
        start_logits[rows, :longest], end_logits[rows, :longest] = start[:, :longest], end[:, :longest]
    return start_logits, end_logits


def question_logits(runner, tokenizer, questions: Sequence[Question | PassagesQuestion], config: QAConfig, *,
                    batch_size: int = FORWARD_BATCH_SIZE):
    """For each question, ``(start_logits, end_logits, offsets, window_passages)`` of its windows
    (``window_passages[i]``: which of its contexts window ``i`` reads): all (question, context) pairs
    are tokenised together and their windows run through the model in shared batches."""
    pairs = [(index, passage, question.question, context) for index, question in enumerate(questions)
             for passage, context in enumerate(contexts_of(question))]
    features = prepare_eval_features([str(i) for i in range(len(pairs))], [pair[2] for pair in pairs],
                                     [pair[3] for pair in pairs], tokenizer, config)
    start_logits, end_logits = predict_logits(runner, features, batch_size=batch_size)
    pair_of_window = features["example_id"].astype(int)
    question_of_window = np.array([pair[0] for pair in pairs], dtype=np.int64)[pair_of_window]
    passage_of_window = np.array([pair[1] for pair in pairs], dtype=np.int64)[pair_of_window]
    for index in range(len(questions)):
        rows = np.flatnonzero(question_of_window == index)
        yield start_logits[rows], end_logits[rows], features["offset_mapping"][rows], passage_of_window[rows]


def answer_questions(
    runner, tokenizer, questions: Sequence[Question | PassagesQuestion], config: QAConfig, *, batch_size: int = FORWARD_BATCH_SIZE
) -> list[list[dict]]:
    """For each question, its ``top_k`` answers ``{"answer", "score", "start", "end", "no_answer_probability"}``.

    The answers are decoded by :func:`qa_common.decoding.decode_spans` (see there for the score and
    the null answer); a :class:`PassagesQuestion`'s by :func:`qa_common.passage_decoding.decode_passages`,
    each answer with the index of its ``passage``.

    ``runner``: see :func:`predict_logits` (a PyTorch model, or a runner of any backend).

    All questions are tokenised together and their windows run through the model in shared
    batches, which is what makes dynamic batching in the server pay off.
    """
    return [reading["answers"] for reading in read_questions(runner, tokenizer, questions, config, batch_size=batch_size)]


def read_questions(
    runner, tokenizer, questions: Sequence[Question | PassagesQuestion], config: QAConfig, *, batch_size: int = FORWARD_BATCH_SIZE
) -> list[dict]:
    """For each question ``{"answers": ...}`` (:func:`answer_questions`' answers); a
    :class:`PassagesQuestion`'s also has ``"passage_order"``: the indices of its passages, the one
    the reader finds an answer in most strongly first (:func:`qa_common.passage_decoding.passage_order`)."""
    if not questions:
        return []
    readings = []
    for question, (start, end, offsets, passages) in zip(
            questions, question_logits(runner, tokenizer, questions, config, batch_size=batch_size)):
        settings = config.replace(max_answer_length=question.max_answer_length,
                                  version_2_with_negative=question.allow_no_answer)
        if isinstance(question, PassagesQuestion):
            readings.append({"answers": decode_passages(start, end, offsets, passages, question.passages, settings,
                                                        top_k=question.top_k),
                             "passage_order": passage_order(start, end, offsets, passages, len(question.passages))})
        else:
            readings.append({"answers": decode_spans(start, end, offsets, question.context, settings,
                                                     top_k=question.top_k)})
    return readings
