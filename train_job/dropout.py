"""Dropout with cheap random numbers for training on CPUs: the same regularisation, a quarter of the cost.

PyTorch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister (about 7 ns
each on this project's machine), and with attention dropout on, PyTorch's fused attention kernel is
not used on CPU (it takes no dropout), so every attention-probability matrix gets a dropout of its
own: together a quarter of the squad-minilm preset's step (BENCHMARKS.md, "Training near the
machine's limit"). Here each element reads 15 bits of one 64-bit draw of the same generator, so four
elements share one draw: the masks are as random, are seeded and checkpointed with the run's other
random numbers, and cost a quarter as much to draw. The drop probability is rounded to a multiple of
2**-15 (0.1 becomes 0.100006) and the kept values are scaled by exactly one over the kept share, so
the expected output equals the input.

:func:`use_cheap_dropout` swaps a model's dropout layers and its attention for these while it
trains; nothing is saved differently, and evaluation (no dropout) computes exactly what it did.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask

RANDOM_BITS = 15  # bits of a draw each element reads: a signed 16-bit lane less its sign bit
ATTENTION = "qa-train-dropout"  # the attention implementation's registered name


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean mask of ``shape`` that keeps each element with probability 1 - ``p`` (rounded to a
    multiple of 2**-15), and the scale that makes the kept values' expectation the input's."""
    count = math.prod(shape)
    # The CPU generator's random_() on int64 fills bits 0..62 (its range is [0, 2**63 - 1]): each
    # 16-bit lane's low 15 bits are uniform, the sign bit of the top lane is not, so it is masked.
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()
    lanes = words.view(torch.int16)[:count].view(shape)
    dropped = round(p * 2**RANDOM_BITS)
    keep = (lanes & (2**RANDOM_BITS - 1)) >= dropped
    return keep, 2**RANDOM_BITS / (2**RANDOM_BITS - dropped)


def cheap_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with :func:`keep_mask`'s random numbers. Autograd keeps only the
    boolean mask for the backward."""
    if not training or p == 0.0:
        return x
    keep, scale = keep_mask(x.shape, p)
    return torch.where(keep, x * scale, 0)


class CheapDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` with :func:`cheap_dropout` (still an ``nn.Dropout``: ``p`` is read and set as before)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cheap_dropout(x, self.p, self.training)


class _DroppedAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + mask) with dropout, times v, in float32. The backward keeps only the
    probabilities and the boolean mask (autograd would also keep the dropped probabilities: a second
    float32 copy of every attention matrix), and every scalar factor is applied to the small
    (length x head size) matrices, not the length x length ones."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling: float, p: float):
        scores = torch.matmul(query.float() * scaling, key.float().transpose(2, 3))
        if mask is not None:
            scores += mask
        probabilities = torch.softmax(scores, dim=-1)
        del scores
        keep, scale = keep_mask(probabilities.shape, p)
        output = torch.matmul(probabilities * keep, value.float()).mul_(scale)
        ctx.save_for_backward(query, key, value, probabilities, keep)
        ctx.scaling, ctx.scale = scaling, scale
        return output.to(value.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probabilities, keep = ctx.saved_tensors
        grad_output = grad_output.float()
        grad_value = torch.matmul((probabilities * keep).transpose(2, 3), grad_output).mul_(ctx.scale)
        grad_dropped = torch.matmul(grad_output, value.float().transpose(2, 3)).mul_(keep)
        # softmax's backward, fused; the dropout's scale and the scores' scaling are applied below
        grad_scores = torch._softmax_backward_data(grad_dropped, probabilities, -1, torch.float32)
        factor = ctx.scale * ctx.scaling
        grad_query = torch.matmul(grad_scores, key.float()).mul_(factor)
        grad_key = torch.matmul(grad_scores.transpose(2, 3), query.float()).mul_(factor)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None


def attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """Attention for training: with dropout, what PyTorch's unfused attention computes (in float32,
    whatever autocast's dtype: scores rounded to bf16 made the preset learn visibly slower) with
    :func:`cheap_dropout`'s masks on the probabilities; without (evaluation, or attention dropout 0),
    PyTorch's fused kernel, as the model otherwise runs."""
    if dropout == 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
    with torch.autocast(query.device.type, enabled=False):
        output = _DroppedAttention.apply(query, key, value, attention_mask, scaling or query.size(-1) ** -0.5, dropout)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, attention)
# The eager implementation's additive float mask; an implementation with no mask registered gets none at all.
AttentionMaskInterface.register(ATTENTION, eager_mask)


def use_cheap_dropout(model: torch.nn.Module) -> int:
    """Swap every ``nn.Dropout`` of ``model`` for a :class:`CheapDropout` of the same ``p`` and its
    attention for :func:`attention`; returns the dropout layers swapped. The weights, the saved config
    and evaluation are untouched (the attention implementation is not saved with the model)."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, CheapDropout(child.p, child.inplace))
                swapped += 1
    model.set_attn_implementation(ATTENTION)
    return swapped


def training_dropout(model: torch.nn.Module, cheap: bool, device: torch.device) -> str:
    """The dropout a training run uses, applied to ``model``: ``"cheap"`` (:func:`use_cheap_dropout`)
    when asked for on a CPU, else ``"torch"`` (a GPU's dropout is already fused). Recorded from what
    was swapped, not from the flag."""
    return "cheap" if cheap and device.type == "cpu" and use_cheap_dropout(model) else "torch"
