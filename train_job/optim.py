"""The optimisation recipe, plain PyTorch (no Ray): AdamW, the learning-rate schedule, one training step.

The Ray Train loop (``train_job.loop``) and the throughput benchmark (``bench.train_throughput``)
both use these functions, so the benchmark times exactly the step that training runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from train_job.loss import micro_batches, model_loss

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``auto`` made concrete for ``device``: bf16 where it is computed natively (a GPU
    that supports it, a CPU with AVX512-BF16 or AMX), else fp32 (bf16 emulated on other CPUs is slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return "bf16" if flags & set(NATIVE_BF16_CPU_FLAGS) else "fp32"


def set_attention_dropout(model: torch.nn.Module, attention_dropout: float | None) -> int:
    """Set the attention-probability dropout of every attention layer for this training (None: keep
    the model's; the saved config keeps it either way); returns the layers changed.

    PyTorch's fused attention kernel on CPU takes no dropout: with any, attention runs unfused,
    materialising every score matrix and drawing a random number for each of its entries (a quarter
    of the squad-minilm preset's step).
    """
    if attention_dropout is None:
        return 0
    layers = [module for module in model.modules()
              if type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None), torch.nn.Dropout)]
    for module in layers:
        module.dropout.p = attention_dropout
    return len(layers)


def checkpoint_layers(model: torch.nn.Module) -> None:
    """--gradient-checkpointing: each layer keeps only its input and runs again in the backward.
    Non-reentrant checkpointing works under DDP and restores the random generator, so the recomputed
    dropout masks are the ones the forward drew: the same gradients."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def sparse_lookup_gradients(model: torch.nn.Module, device: torch.device, compiled: bool = False) -> bool:
    """On a CPU, make the word embedding's backward sparse: its gradient names only the rows the batch's
    tokens read. Returns whether it did (an ``applied`` fact of the run).

    A dense lookup gradient is a zeroed vocabulary x hidden matrix (47 MB for MiniLM) per backward, and
    with ``--max-batch-tokens`` one backward per part of a batch, each added into the last: 66 ms a step
    against 22 ms sparse, timed alone at the preset's parts on the EPYC VM; 1.015x the preset's windows/s
    (BENCHMARKS.md, "A sparse lookup gradient").
    :func:`densify_gradients` makes it dense once per step, before clipping and the update, so the
    optimiser and everything after the backward see what they saw; DDP all-reduces a sparse gradient
    (Gloo), so it is set before the model is wrapped. The sums differ from the dense path's by float
    rounding only (the same terms, added in another order). On a GPU the dense path is cheap, and a
    ``compiled`` model (``--compile``) keeps it too: inductor cannot compile the sparse backward and
    breaks the graph around it.
    """
    if device.type != "cpu" or compiled:
        return False
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding):
        return False
    embedding.sparse = True
    return True


def densify_gradients(model: torch.nn.Module) -> None:
    """Every sparse gradient of ``model`` made dense, in place of the sparse one."""
    for parameter in model.parameters():
        if parameter.grad is not None and parameter.grad.is_sparse:
            parameter.grad = parameter.grad.to_dense()


def build_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only: biases and LayerNorm are not decayed (as BERT).

    ``fused`` (one kernel for all parameters) defaults to on for a model on a GPU or a CPU: PyTorch's
    default on a CPU is a loop of about ten operations per parameter, 3-4 % of the squad-minilm preset's
    step where the CPU has AMX (BENCHMARKS.md, "Training near the machine's limit"); the updates agree to
    float rounding.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(parameter)
    if fused is None:
        fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, fused=fused,
    )


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at ``step``: 0 -> 1 linearly over the warm-up, then 1 -> 0 linearly.

    The schedule of BERT and of Hugging Face's ``get_linear_schedule_with_warmup``; step 0 already
    gets ``1 / warmup_steps`` so the first update is not wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))


def build_scheduler(optimizer, *, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup_steps=warmup_steps, total_steps=total_steps)
    )


def train_step(model, batch: dict, *, optimizer, scheduler, scaler, autocast, max_grad_norm: float = 1.0,
               max_tokens: int | None = None):
    """Forward, backward, clip, update; returns the loss (a tensor, not synchronised to the host):
    :func:`train_job.loss.model_loss`, per window or shared over each question's windows. With
    ``max_tokens`` the batch's gradients are accumulated over parts of at most that many tokens
    (:func:`train_job.loss.micro_batches`) before the one update: the activations of one part at a time.

    With a loss scaler (fp16) a non-finite gradient makes the scaler skip the update; without one it
    raises FloatingPointError before the weights are touched. Under DDP the clipped norm is that of
    the all-reduced gradients, the same on every worker, so all workers stop together.
    """
    parts = micro_batches(batch, max_tokens)
    loss = None
    for index, (part, share) in enumerate(parts):
        # Under DDP the gradients are all-reduced once, in the last part's backward.
        last = index == len(parts) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast:
                part_loss = model_loss(model, part) * share
            scaler.scale(part_loss).backward()
        loss = part_loss.detach() if loss is None else loss + part_loss.detach()
    densify_gradients(model)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if not scaler.is_enabled() and not torch.isfinite(grad_norm):
        raise FloatingPointError(f"loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}")
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
