"""Driver-side data: read and validate the questions, then Ray Data turns them into features."""

from __future__ import annotations

import functools
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qa_common import (
    QAConfig, length_grouped_batches, load_hub_squad, load_tokenizer, prepare_eval_features, prepare_train_features,
    read_squad, resolve_model_path, synthesise_negatives,
)
from qa_common.features import MODEL_INPUTS
from qa_common.splits import hold_out_articles, sample_questions
from train_job.config import TrainConfig

FEATURIZE_BATCH = 256  # questions per Ray Data task


def load_splits(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Training and validation records, validated before any worker starts.

    The validation split is the validation file (or data set split), or with
    ``config.holdout_questions`` whole articles held out of the training data. ``max_*_samples``
    then choose questions (``config.sample``: spread over the articles, or the first N);
    ``config.mix_file`` adds ``mix_ratio`` of its questions per training question (and
    ``mix_validation`` others to the validation split). With
    ``config.negative_ratio`` > 0, synthetic unanswerable questions are added per answerable
    question: to the training data from its own paragraphs, and to validation data that has no
    unanswerable question from the validation paragraphs (so the no-answer threshold and the
    calibration are chosen on both kinds). ``config.qa.version_2_with_negative`` is turned on when
    the training data then holds unanswerable questions (a model trained on them may answer "not in
    this document").
    """
    if config.dataset:
        train = load_hub_squad(config.dataset, "train")
        validation = None if config.holdout_questions else load_hub_squad(config.dataset, "validation")
    else:
        train = read_squad(config.train_file)
        validation = None if config.holdout_questions else read_squad(config.validation_file)
    if config.holdout_questions:
        train, validation = hold_out_articles(train, config.holdout_questions, seed=config.seed)
        print(f"[train_job] validating on {len(validation)} questions of "
              f"{len({r['title'] for r in validation})} held-out article(s) (--holdout-questions)", flush=True)
    train = sample_questions(train, config.max_train_samples, seed=config.seed, how=config.sample)
    validation = sample_questions(validation, config.max_eval_samples, seed=config.seed, how=config.sample)
    if config.mix_file:
        train, validation = mixed_in(train, validation, config)
    if config.negative_ratio > 0:
        train = with_negatives(train, config, "training")
        if all(r["answers"]["text"] for r in validation):
            validation = with_negatives(validation, config, "validation")
    if not config.qa.version_2_with_negative and any(not r["answers"]["text"] for r in train):
        print("[train_job] the training data has unanswerable questions: SQuAD 2.0 decoding and evaluation "
              "(--version-2-with-negative)", flush=True)
        config.qa = config.qa.replace(version_2_with_negative=True)
    return train, validation


def mixed_in(train: list[dict], validation: list[dict], config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """``train`` with ``mix_ratio`` questions per training question from ``config.mix_file``, shuffled
    together (seeded), and ``validation`` with ``mix_validation`` others; one seeded draw spread over
    the file's articles, cut in two."""
    pool = read_squad(config.mix_file, require_answers=False)
    wanted, held = round(config.mix_ratio * len(train)), config.mix_validation or 0
    drawn = sample_questions(pool, wanted + held, seed=config.seed, how="spread")
    random.Random(config.seed).shuffle(drawn)  # both parts spread over the articles
    taken = {record["id"] for record in train + validation}
    drawn = [record if record["id"] not in taken else {**record, "id": f"mix-{record['id']}"} for record in drawn]
    mix, to_validation = drawn[: len(drawn) - held], drawn[len(drawn) - held :]
    print(f"[train_job] mixed {len(mix)} questions of --mix-file into {len(train)} training questions "
          f"(--mix-ratio {config.mix_ratio:g})" + (f" and {len(to_validation)} into {len(validation)} validation "
          "questions (--mix-validation)" if held else ""), flush=True)
    records = train + mix
    random.Random(config.seed).shuffle(records)
    return records, validation + to_validation


def with_negatives(records: list[dict], config: TrainConfig, split: str) -> list[dict]:
    """``records`` and their synthesised negatives, shuffled together (seeded)."""
    negatives = synthesise_negatives(records, config.negative_ratio, seed=config.seed, source=config.negative_source)
    print(f"[train_job] synthesised {len(negatives)} unanswerable {split} questions (--negative-ratio "
          f"{config.negative_ratio:g}, --negative-source {config.negative_source})", flush=True)
    records = records + negatives
    random.Random(config.seed).shuffle(records)  # negatives spread over the file, not appended at its end
    return records


@functools.lru_cache(maxsize=1)
def featurizing_tokenizer(model: str, stamp: tuple):
    """The tokenizer of ``model``, loaded once per Ray worker process and kept for the tasks after it
    (``stamp``: its files' sizes and times, so a model directory rewritten in place is read again)."""
    return load_tokenizer(model)


def tokenizer_stamp(model: str) -> tuple:
    """Sizes and modification times of a local model directory's files (a Hub name: empty)."""
    directory = Path(resolve_model_path(model))
    if not directory.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()))


def train_features_of(batch: dict[str, np.ndarray], *, model: str, stamp: tuple, qa_config: QAConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: question batches -> training features (with each window's question ``group``
    when the rows have one)."""
    return prepare_train_features(batch["question"], batch["context"], batch["answer_start"], batch["answer_text"],
                                  featurizing_tokenizer(model, stamp), qa_config, groups=batch.get("group"))


def eval_features_of(batch: dict[str, np.ndarray], *, model: str, stamp: tuple, qa_config: QAConfig) -> dict[str, np.ndarray]:
    """Ray Data UDF: question batches -> evaluation features, keeping each feature's example index."""
    features = prepare_eval_features(batch["example_index"], batch["question"], batch["context"],
                                     featurizing_tokenizer(model, stamp), qa_config)
    features["example_index"] = features.pop("example_id").astype(np.int64)
    return features


def feature_datasets(config: TrainConfig, train: list[dict], validation: list[dict]):
    """Training and validation features, as one array per column each.

    Ray Data featurises both at once, in tasks (Ray's worker processes keep the tokenizer between
    tasks, so a run on a warm cluster starts no process for it). Sliding windows turn one question
    into one or more features, hence ``udf_modifying_row_count=True``. Validation features keep the
    index of their question, which decides the worker that evaluates it (all windows of a question
    on one worker). With ``config.shared_normalization`` every training window carries the index of
    its question's ``group`` (a record without one is a group of its own).
    """
    import ray.data

    train_rows = [  # an unanswerable question has answer text "" (labelled at [CLS])
        {"question": r["question"], "context": r["context"],
         "answer_start": (r["answers"]["answer_start"] or [0])[0], "answer_text": (r["answers"]["text"] or [""])[0]}
        for r in train
    ]
    if config.shared_normalization:
        index: dict[str, int] = {}
        for row, record in zip(train_rows, train):
            row["group"] = index.setdefault(record.get("group", record["id"]), len(index))
    validation_rows = [
        {"example_index": i, "question": r["question"], "context": r["context"]} for i, r in enumerate(validation)
    ]
    kwargs = {"model": config.model, "stamp": tokenizer_stamp(config.model), "qa_config": config.qa}

    def featurize(rows: list[dict], udf):
        dataset = ray.data.from_items(rows).map_batches(udf, fn_kwargs=kwargs, batch_size=FEATURIZE_BATCH,
                                                        batch_format="numpy", udf_modifying_row_count=True)
        dataset.context.enable_progress_bars = False  # two at once would draw over each other
        return feature_columns(dataset)

    with ThreadPoolExecutor(1) as other:  # both pipelines share the cluster's CPUs
        validation_features = other.submit(featurize, validation_rows, eval_features_of)
        return compact_tokens(featurize(train_rows, train_features_of)), validation_features.result()


def feature_columns(dataset) -> dict[str, np.ndarray]:
    """A Ray Dataset as one array per column (to ``ray.put`` once and index per epoch)."""
    blocks = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


def compact_tokens(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``features`` with each token column in the smallest unsigned type that holds its values (token
    ids of a vocabulary under 65,536 in 2 bytes, masks and segment ids in 1): every worker reads the
    training windows in place from the object store, so they are part of its resident memory, a
    third of their int32 size (170 MB for the squad-minilm preset's 55,000 windows). Batches become
    int64 tensors as before."""
    return {name: values.astype(np.min_scalar_type(int(values.max(initial=0))), copy=False)
            if name in MODEL_INPUTS else values for name, values in features.items()}


@dataclass(frozen=True)
class TrainingUnits:
    """What an epoch shuffles and cuts into batches: single windows, or with shared normalisation
    whole questions (every window of a group), so that no question's softmax spans two batches."""

    lengths: np.ndarray  # real tokens per unit (its longest window): what length grouping sorts by
    rows: list[np.ndarray] | None  # each unit's window rows; None: unit i is window i
    per_batch: int  # units per batch

    def __len__(self) -> int:
        return len(self.lengths)

    def windows(self, units: np.ndarray) -> np.ndarray:
        return units if self.rows is None else np.concatenate([self.rows[unit] for unit in units])


def training_units(features: dict[str, np.ndarray], batch_size: int) -> TrainingUnits:
    """Units of ``features``: questions when they carry a ``group`` column, batched ``batch_size``
    windows at a time on average (a batch holds whole questions, so its size varies), else windows."""
    lengths = features["attention_mask"].sum(axis=1)
    if "group" not in features:
        return TrainingUnits(lengths, None, batch_size)
    _, group = np.unique(features["group"], return_inverse=True)
    order = np.argsort(group, kind="stable")
    rows = np.split(order, np.flatnonzero(np.diff(group[order])) + 1)
    per_batch = max(1, round(batch_size * len(rows) / len(lengths)))
    return TrainingUnits(np.array([lengths[r].max() for r in rows]), rows, per_batch)


def epoch_shard(num_features: int, num_workers: int, rank: int, epoch: int, seed: int) -> np.ndarray:
    """The indices of the training windows worker ``rank`` trains on in ``epoch``.

    Each epoch draws one seeded permutation of *all* windows (the same on every worker: it depends
    on the seed and the epoch only) and each worker takes its contiguous slice of it, the slices'
    sizes differing by at most one. So every epoch each worker sees a new uniform sample of the
    whole set, and together the workers see every window exactly once: the guarantee of Ray Data's
    ``random_shuffle`` followed by an exact split, without a shuffle job per epoch competing with
    the workers for CPUs. The windows sit in the object store once (``ray.put``), an epoch's order is
    a permutation of indices, and a run resumed mid-epoch recomputes the same order.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_features)
    return order[num_features * rank // num_workers : num_features * (rank + 1) // num_workers]


def epoch_batches(shard: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  group_batches: int = 1) -> list[np.ndarray]:
    """``shard`` cut into batches of indices; with ``group_batches`` > 1, windows of similar length
    (``lengths``: real tokens per window) are batched together within each run of ``group_batches``
    batches of the shuffled shard (:func:`qa_common.length_grouped_batches`), so the padding trimmed
    per batch is mostly removed while the order stays random."""
    if group_batches == 1:
        return [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    group = group_batches * batch_size
    # length_grouped_batches sorts each group by the row sums of its length key: one column per row.
    groups = ({"index": shard[i : i + group], "length": lengths[shard[i : i + group], None]}
              for i in range(0, len(shard), group))
    return [batch["index"] for batch in length_grouped_batches(groups, batch_size, rng, length_key="length")]
