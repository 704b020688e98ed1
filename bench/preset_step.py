"""The ``squad-minilm`` preset's training step outside Ray, as ``train_job``'s loop builds and takes it:
its windows, model, optimiser, schedule, autocast and length-grouped batches, for the benchmarks that
time or compare steps (``bench.train_limits``, ``bench.dropout_seeds``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench import benchlib


def preset_config():
    from train_job.config import TrainConfig
    from train_job.presets import preset_values

    return TrainConfig.from_dict({k: v for k, v in preset_values("squad-minilm").items() if k not in ("dataset", "output_dir")})


def prepare_features(args, path: Path) -> dict:
    """The preset's training windows of ``--questions`` questions (and their negatives), saved to ``path``."""
    from qa_common import load_tokenizer, prepare_train_features, read_squad
    from qa_common.splits import sample_questions
    from train_job.data import with_negatives

    config = preset_config()
    data = args.data or (benchlib.SQUAD_FULL_TRAIN if benchlib.SQUAD_FULL_TRAIN.is_file() else benchlib.QUICKSTART_TRAIN)
    records = with_negatives(sample_questions(read_squad(data), args.questions, seed=config.seed), config, "training")
    features = prepare_train_features(
        [r["question"] for r in records], [r["context"] for r in records],
        [(r["answers"]["answer_start"] or [0])[0] for r in records], [(r["answers"]["text"] or [""])[0] for r in records],
        load_tokenizer(args.model), config.qa)
    np.savez(path, **{name: np.asarray(values) for name, values in features.items()})
    return {"data": benchlib.data_label(Path(data)), "questions": len(records), "windows": len(features["input_ids"])}


def preset_autocast():
    """The preset's autocast on this CPU, as ``train_job``'s loop builds it (bf16 where the CPU computes it natively)."""
    import torch

    from train_job.loop import AUTOCAST_DTYPES
    from train_job.optim import resolve_precision

    precision = resolve_precision(preset_config().precision, torch.device("cpu"))
    return torch.autocast("cpu", dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


def preset_training(model_name: str, total_steps: int, *, attention_dropout: float | None = None,
                    cheap_dropout: bool = False, gradient_checkpointing: bool = False, dropout_seed: int | None = None,
                    max_tokens: int | None = None, fused_adamw: bool | None = None, sparse_lookup: bool = True):
    """``(model, step)``: the preset's model, optimiser, schedule and autocast as ``train_job``'s loop builds
    them, ``step(batch)`` taking one training step and returning its loss. ``dropout_seed`` re-seeds the
    generator once the model is loaded, so only the dropout masks differ from the run's own; ``max_tokens``
    is ``--max-batch-tokens`` (None: the whole batch at once); ``fused_adamw`` None is the loop's choice;
    ``sparse_lookup`` False keeps the word embedding's gradient dense, as the loop did before."""
    import torch

    from qa_common import load_model_and_tokenizer
    from train_job.dropout import use_cheap_dropout
    from train_job.optim import (build_optimizer, build_scheduler, checkpoint_layers, set_attention_dropout,
                                 sparse_lookup_gradients, train_step)

    config = preset_config()
    torch.manual_seed(config.seed)
    model, _ = load_model_and_tokenizer(model_name, dtype=torch.float32)
    set_attention_dropout(model, attention_dropout)
    if cheap_dropout:
        use_cheap_dropout(model)
    if gradient_checkpointing:
        checkpoint_layers(model)
    if sparse_lookup:
        sparse_lookup_gradients(model, torch.device("cpu"))
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    autocast = preset_autocast()
    optimizer = build_optimizer(model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                                fused=fused_adamw)
    scheduler = build_scheduler(optimizer, warmup_steps=int(config.warmup_ratio * total_steps), total_steps=total_steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    return model, lambda batch: train_step(model, batch, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                           autocast=autocast, max_tokens=max_tokens)


def preset_steps(model_name: str, features: dict, steps: int, *, length_multiple: int | None = None,
                 attention_dropout: float | None = None, cheap_dropout: bool = False, dropout_seed: int | None = None,
                 threads: int | None = None, gradient_checkpointing: bool = False, max_tokens: int | None = None,
                 fused_adamw: bool | None = None, sparse_lookup: bool = True):
    """The preset's training steps in this process, as ``train_job``'s loop takes them (:func:`preset_training`,
    its length-grouped batch order and padding cut to ``length_multiple``): yields each step's windows,
    padded tokens and loss. The model is loaded before the first step is asked for."""
    import torch

    from train_job.data import epoch_batches
    from train_job.loop import GROUP_BATCHES, TRAIN_LENGTH_MULTIPLE, training_batch

    config = preset_config()
    torch.set_num_threads(threads or os.cpu_count())
    _, step = preset_training(model_name, steps, attention_dropout=attention_dropout, cheap_dropout=cheap_dropout,
                              gradient_checkpointing=gradient_checkpointing, dropout_seed=dropout_seed,
                              max_tokens=max_tokens, fused_adamw=fused_adamw, sparse_lookup=sparse_lookup)
    lengths = features["attention_mask"].sum(axis=1)
    rng = np.random.default_rng(config.seed)
    batches = epoch_batches(rng.permutation(len(lengths)), lengths, config.per_device_batch_size, rng, GROUP_BATCHES)
    batches = (batches * (1 + steps // len(batches)))[:steps]

    def take_steps():
        for rows in batches:
            batch = training_batch(features, rows, multiple_of=length_multiple or TRAIN_LENGTH_MULTIPLE)
            loss = step(batch)
            yield {"windows": len(rows), "padded_tokens": batch["input_ids"].numel(), "loss": float(loss)}

    return take_steps()


def step_inputs(model, length: int, batch_size: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, model.config.vocab_size, (batch_size, length), generator=generator),
            "token_type_ids": torch.zeros(batch_size, length, dtype=torch.long),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "start_positions": torch.randint(0, length, (batch_size,), generator=generator),
            "end_positions": torch.randint(0, length, (batch_size,), generator=generator)}
