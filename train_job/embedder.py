"""``python -m train_job.embedder``: fine-tune the library's sentence embedder on the library's own questions.

The pairs come from ``python -m library_job mine``'s groups (OUTPUT/train.json): a question, a read
passage that holds its answer (the positive), and the read passages that do not (hard negatives:
what hybrid search ranked high for it but cannot answer it). A question none of whose passages
answers it (its article left out of the library) teaches nothing here and is skipped.

The loss is DPR's (and sentence-transformers' ``MultipleNegativesRankingLoss``): for a batch of
questions, a softmax over the scaled cosine similarities of each question with every positive and
hard negative of the batch, its own positive the target. A candidate that is another question's
positive and holds this question's answer too (two questions of one paragraph) is masked out, not
counted as a negative. The pooling is :func:`qa_common.library.embedding.embed_batch`'s, so the
model directory written is an ``--embedder`` for ``python -m library_job build`` as it is.

A thin Ray Train wrapper (TorchTrainer, ``--num-workers`` data-parallel workers) around that loop.
Before and after, the driver measures recall@1/5 on held-out questions (``--validation-share``): each
question's positive ranked among every candidate passage of the held-out groups. Writes
OUTPUT/model and OUTPUT/metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qa_common import SquadFormatError, read_squad
from qa_common.config import add_dataclass_flags, dashed, given_flags
from qa_common.config import setting as _flag
from qa_common.library.embedding import EMBEDDER, Embedder, embed_batch, tokenize_for_embedding
from qa_common.library.search import recall_at
from train_job.allocator import DEFAULT_ALLOCATOR, worker_runtime_env
from train_job.ray_cluster import ADDRESS_HELP, connect_ray

RECALL_AT = (1, 5)


@dataclass
class EmbedderConfig:
    train_file: str = _flag("`python -m library_job mine`'s train.json: questions grouped with their read passages",
                            default="runs/library-mined/train.json")
    output_dir: str = _flag("where the model directory and metrics.json go", default="runs/embedder")
    model: str = _flag("the sentence embedder to fine-tune (name or directory)", default=EMBEDDER)
    epochs: int = _flag("passes over the pairs", default=1)
    learning_rate: float = _flag("peak AdamW learning rate (linear warm-up over a tenth, then decay)", default=2e-5)
    batch_size: int = _flag("questions per worker per step: each is scored against every candidate of the batch",
                            default=32)
    mini_batch_size: int = _flag(
        "texts embedded at once, when > 0 and below a batch's questions and passages: any --batch-size in the "
        "memory of this many, for one more forward pass (a gradient cache)", default=0)
    hard_negatives: int = _flag("read passages without the answer per question, best ranked first", default=1)
    scale: float = _flag("cosine similarities are multiplied by this before the softmax", default=20.0)
    cheap_dropout: bool = _flag(
        "on CPU workers, train_job/dropout.py's dropout masks and attention (as train_job --cheap-dropout): "
        "a quarter of the random numbers' cost; another random stream than PyTorch's", default=True)
    validation_share: float = _flag("share of the questions held out to measure recall before and after", default=0.1)
    num_workers: int = _flag("Ray Train workers", default=1)
    cpus_per_worker: float = _flag("CPUs per worker", default=2.0)
    seed: int = _flag("seed of the split and the order", default=0)
    address: str | None = _flag(ADDRESS_HELP, default=None)

    def validate(self) -> "EmbedderConfig":
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker", "learning_rate", "scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{dashed(name)} must be positive, got {getattr(self, name)}")
        if self.mini_batch_size < 0:
            raise ValueError(f"--mini-batch-size must be >= 0, got {self.mini_batch_size}")
        if self.hard_negatives < 0 or not 0 < self.validation_share < 1:
            raise ValueError("--hard-negatives must be >= 0 and --validation-share in (0, 1)")
        return self


def training_pairs(records: list[dict], hard_negatives: int) -> list[dict]:
    """Per group with an answering passage: ``{"question", "positive", "negatives", "answering"}``
    (``answering``: every read passage that holds the answer, masked when it is another's candidate)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record.get("group", record["id"]), []).append(record)
    pairs = []
    for group in groups.values():
        answering = [r["context"] for r in group if r["answers"]["text"]]
        if answering:
            pairs.append({"question": group[0]["question"], "positive": answering[0], "answering": answering,
                          "negatives": [r["context"] for r in group if not r["answers"]["text"]][:hard_negatives]})
    return pairs


def _batch_targets(pairs: list[dict]):
    """``(candidates, target, mask)``: the batch's distinct candidate passages, each question's positive
    among them, and the candidates masked out of each question's softmax (its other answering ones)."""
    import torch

    candidates = list(dict.fromkeys(text for pair in pairs for text in [pair["positive"], *pair["negatives"]]))
    index = {text: i for i, text in enumerate(candidates)}
    target = torch.tensor([index[pair["positive"]] for pair in pairs])
    mask = torch.zeros((len(pairs), len(candidates)), dtype=torch.bool)
    for row, pair in enumerate(pairs):
        mask[row, [index[text] for text in pair["answering"] if text in index and text != pair["positive"]]] = True
    return candidates, target, mask


def _in_batch_loss(questions, passages, target, mask, scale: float):
    import torch

    scores = scale * questions.float() @ passages.float().T
    return torch.nn.functional.cross_entropy(scores.masked_fill(mask, float("-inf")), target)


def pair_loss(model, tokenizer, pairs: list[dict], scale: float):
    """The in-batch loss of ``pairs`` (see the module docstring)."""
    candidates, target, mask = _batch_targets(pairs)
    questions = embed_batch(model, tokenize_for_embedding(tokenizer, [pair["question"] for pair in pairs]))
    passages = embed_batch(model, tokenize_for_embedding(tokenizer, candidates))
    return _in_batch_loss(questions, passages, target, mask, scale)


def cached_pair_loss_backward(model, tokenizer, pairs: list[dict], scale: float, mini_batch: int, autocast) -> float:
    """``pair_loss(...).backward()`` in the memory of ``mini_batch`` texts at a time, for batches larger
    than the activations of all their texts would fit: a gradient cache (Gao et al. 2021, "Scaling Deep
    Contrastive Learning Batch Size under Memory Limited Setup"; sentence-transformers'
    ``CachedMultipleNegativesRankingLoss``). Every text is embedded without a graph, the loss's gradient
    with respect to the embeddings is taken, then each mini-batch is embedded again with a graph, with
    the random numbers (dropout) of its first pass, and backpropagated with its part of that gradient.
    The gradients are those of one graph over the same mini-batches; the cost, one more forward pass.
    Returns the loss."""
    import contextlib

    import torch

    def random_state():  # dropout's generators: the CPU's, and a GPU's where the model is on one
        return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    def set_random_state(state):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    candidates, target, mask = _batch_targets(pairs)
    texts = [pair["question"] for pair in pairs] + candidates
    chunks = [texts[begin : begin + mini_batch] for begin in range(0, len(texts), mini_batch)]
    states, embeddings = [], []
    with torch.no_grad(), autocast:
        for chunk in chunks:
            states.append(random_state())
            embeddings.append(embed_batch(model, tokenize_for_embedding(tokenizer, chunk)).float())
    cached = torch.cat(embeddings).requires_grad_()
    loss = _in_batch_loss(cached[: len(pairs)], cached[len(pairs) :], target, mask, scale)
    loss.backward()
    for number, (chunk, state, gradient) in enumerate(zip(chunks, states, cached.grad.split(mini_batch))):
        last = number == len(chunks) - 1  # data-parallel workers average gradients once, after the last
        with (contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            set_random_state(state)
            with autocast:
                embedded = embed_batch(model, tokenize_for_embedding(tokenizer, chunk))
            (embedded.float() * gradient).sum().backward()
    return loss.item()


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from ray.experimental import tqdm_ray
    from transformers import AutoModel

    from qa_common.modeling import load_tokenizer, resolve_model_path
    from train_job.allocator import set_up_allocator
    from train_job.dropout import training_dropout
    from train_job.optim import build_optimizer, build_scheduler, resolve_precision

    config = EmbedderConfig(**loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, math.ceil(config.cpus_per_worker)))
    set_up_allocator()  # as train_job's CPU workers (train_job/allocator.py)
    torch.manual_seed(config.seed)
    pairs = ray.get(loop_config["pairs"])
    tokenizer = load_tokenizer(config.model)
    device = ray.train.torch.get_device()
    model = AutoModel.from_pretrained(resolve_model_path(config.model))
    dropout = training_dropout(model, config.cheap_dropout, device)
    model = ray.train.torch.prepare_model(model)
    steps = config.epochs * math.ceil(math.ceil(len(pairs) / world) / config.batch_size)
    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=steps // 10, total_steps=steps)
    # bf16 autocast where the CPU computes it natively, as train_job --precision auto (fp32 master weights).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=resolve_precision("auto", device) == "bf16")
    model.train()
    for epoch in range(config.epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(pairs))[rank::world]
        started, losses = time.perf_counter(), []
        bar = tqdm_ray.tqdm(total=math.ceil(len(order) / config.batch_size), unit="step",
                            desc=f"embedder epoch {epoch + 1}/{config.epochs}") if rank == 0 else None
        for begin in range(0, len(order), config.batch_size):
            batch = [pairs[i] for i in order[begin : begin + config.batch_size]]
            if config.mini_batch_size:
                loss = cached_pair_loss_backward(model, tokenizer, batch, config.scale, config.mini_batch_size,
                                                 autocast)
            else:
                with autocast:
                    loss = pair_loss(model, tokenizer, batch, config.scale)
                loss.backward()
                loss = loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if bar is not None:
                bar.update(1)
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                   "pairs_per_s": len(order) / (time.perf_counter() - started),
                   "training_dropout": dropout}
        if bar is not None:
            bar.close()
            print(f"[train_job.embedder] epoch {epoch + 1}: loss {metrics['loss']:.4f}, "
                  f"{metrics['pairs_per_s']:.1f} pairs/s", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0 and epoch + 1 == config.epochs:
                getattr(model, "module", model).save_pretrained(directory)
                tokenizer.save_pretrained(directory)
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)


def recall(model: str, pairs: list[dict]) -> dict:
    """Recall@1/5 of each question's positive among every candidate passage of ``pairs``
    (another question's passage that also answers it counts as found)."""
    embedder = Embedder(model)
    candidates = list(dict.fromkeys(text for pair in pairs for text in [pair["positive"], *pair["negatives"]]))
    scores = embedder.embed([pair["question"] for pair in pairs]) @ embedder.embed(candidates).T
    ranks = []
    for row, pair in enumerate(pairs):
        order = np.argsort(-scores[row])
        hits = [rank for rank, i in enumerate(order, start=1) if candidates[i] in pair["answering"]]
        ranks.append(hits[0] if hits else 0)
    return {f"recall@{k}": recall_at(ranks, k) for k in RECALL_AT}


def train(config: EmbedderConfig) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pairs = training_pairs(read_squad(config.train_file), config.hard_negatives)
    if len(pairs) < 2:
        raise ValueError(f"{config.train_file}: {len(pairs)} question(s) with an answering passage; "
                         "mine more with `python -m library_job mine`")
    random.Random(config.seed).shuffle(pairs)
    held = max(1, round(config.validation_share * len(pairs)))
    validation, pairs = pairs[:held], pairs[held:]
    output = Path(config.output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    print(f"[train_job.embedder] {len(pairs)} training questions, {len(validation)} held out", flush=True)
    before = recall(config.model, validation)
    connect_ray(config.address)
    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": dataclasses.asdict(config), "pairs": ray.put(pairs)},
            scaling_config=ScalingConfig(num_workers=config.num_workers,
                                         resources_per_worker={"CPU": config.cpus_per_worker}),
            run_config=RunConfig(name="embedder", storage_path=storage,
                                 worker_runtime_env=worker_runtime_env(DEFAULT_ALLOCATOR)),
        ).fit()
        model_dir = output / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        with result.checkpoint.as_directory() as directory:
            shutil.copytree(directory, model_dir)
    metrics = {"train_questions": len(pairs), "validation_questions": len(validation), **result.metrics,
               "before": before, "after": recall(str(model_dir), validation), "model": config.model}
    metrics.pop("checkpoint_dir_name", None)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: metrics[k] for k in ("before", "after")}), flush=True)
    print(f"[train_job.embedder] wrote {model_dir}: build a library with it, "
          f"`python -m library_job build DOCS --library NEW_DIR --embedder {model_dir}`", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train_job.embedder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, EmbedderConfig)
    args = parser.parse_args(argv)
    try:
        config = EmbedderConfig(**given_flags(args, EmbedderConfig)).validate()
        train(config)
    except (SquadFormatError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
