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
    keep = lanes.bitwise_and_(2**RANDOM_BITS - 1) >= dropped  # in place: the draws are this call's own
    return keep, 2**RANDOM_BITS / (2**RANDOM_BITS - dropped)


def ones_and_zeros(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` as the factor that zeroes the dropped elements: its 0/1 bytes seen as uint8. A float
    times it is the float times the boolean, bit for bit, but PyTorch's CPU kernels multiply by a
    boolean through a slow casting path: 3.4x the time at the attention's size (BENCHMARKS.md)."""
    return keep.view(torch.uint8)


def cheap_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout`` with :func:`keep_mask`'s random numbers. Autograd keeps only the
    boolean mask for the backward."""
    if not training or p == 0.0:
        return x
    keep, scale = keep_mask(x.shape, p)
    return (x * ones_and_zeros(keep)).mul_(scale)


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
        dtypes = query.dtype, key.dtype, value.dtype
        # Contiguous float32 copies, made once and kept for the backward: q, k and v arrive as views
        # of the heads' transpose, which every matmul would otherwise copy again (and the backward
        # cast again); they are small next to the length x length matrices kept with them.
        query, key, value = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (query, key, value))
        scores = torch.matmul(query * scaling, key.transpose(2, 3))
        if mask is not None:
            scores += mask
        probabilities = torch.softmax(scores, dim=-1)
        del scores
        keep, scale = keep_mask(probabilities.shape, p)
        output = torch.matmul(probabilities * ones_and_zeros(keep), value).mul_(scale)
        ctx.save_for_backward(query, key, value, probabilities, keep)
        ctx.scaling, ctx.scale, ctx.dtypes = scaling, scale, dtypes
        return output.to(dtypes[2])

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probabilities, keep = ctx.saved_tensors
        grad_output = grad_output.to(torch.float32, memory_format=torch.contiguous_format)  # two matmuls read it
        grad_value = torch.matmul((probabilities * ones_and_zeros(keep)).transpose(2, 3), grad_output).mul_(ctx.scale)
        grad_dropped = torch.matmul(grad_output, value.transpose(2, 3)).mul_(ones_and_zeros(keep))
        # softmax's backward, fused; the dropout's scale and the scores' scaling are applied below
        grad_scores = torch._softmax_backward_data(grad_dropped, probabilities, -1, torch.float32)
        factor = ctx.scale * ctx.scaling
        grad_query = torch.matmul(grad_scores, key).mul_(factor)
        grad_key = torch.matmul(grad_scores.transpose(2, 3), query).mul_(factor)
        grads = (grad.to(dtype) for grad, dtype in zip((grad_query, grad_key, grad_value), ctx.dtypes))
        return *grads, None, None, None


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
