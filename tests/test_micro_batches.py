"""--max-batch-tokens: a batch's gradients added up over parts of at most N tokens give the batch's update."""

import contextlib
import copy

import pytest
import torch

from train_job.loss import micro_batches
from train_job.optim import train_step


def batch_of(rows: int, length: int, groups: list[int] | None = None, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    real = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < real[:, None]).long()
    batch = {"input_ids": torch.randint(5, 50, (rows, length), generator=generator) * mask,
             "attention_mask": mask,
             # answers inside some windows, [CLS] (0) in the others
             "start_positions": torch.where(torch.arange(rows) % 3 == 0, 0, 2 + torch.arange(rows) % 4),
             "end_positions": torch.where(torch.arange(rows) % 3 == 0, 0, 4 + torch.arange(rows) % 4)}
    if groups is not None:
        batch["group"] = torch.tensor(groups)
    return batch


def test_windows_are_cut_into_even_parts_within_the_bound():
    batch = batch_of(16, 12)
    parts = micro_batches(batch, 60)  # 5 windows of 12 tokens fit: 16 windows -> 4 parts of 4
    assert [len(part["input_ids"]) for part, _ in parts] == [4, 4, 4, 4]
    assert [share for _, share in parts] == [0.25] * 4
    assert torch.equal(torch.cat([part["input_ids"] for part, _ in parts]), batch["input_ids"])
    assert micro_batches(batch, 16 * 12) == [(batch, 1.0)] and micro_batches(batch, None) == [(batch, 1.0)]


def test_a_questions_windows_stay_in_one_part_and_shares_count_questions():
    # questions of 3, 1, 2 and 2 windows, in the order the loop batches them (a question's rows together)
    batch = batch_of(8, 10, groups=[7, 7, 7, 3, 9, 9, 5, 5])
    parts = micro_batches(batch, 30)  # three windows a part
    assert [part["group"].tolist() for part, _ in parts] == [[7, 7, 7], [3, 9, 9], [5, 5]]
    assert [share for _, share in parts] == [0.25, 0.5, 0.25]
    # a question longer than the bound is a part of its own
    assert [part["group"].tolist() for part, _ in micro_batches(batch, 20)] == [[7, 7, 7], [3], [9, 9], [5, 5]]


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 2, 2, 2, 3, 4, 4, 5]], ids=["per-window", "shared"])
def test_a_step_over_parts_makes_the_whole_batchs_update(tiny_model_and_tokenizer, groups):
    model, _ = tiny_model_and_tokenizer  # in eval mode: no dropout, so both steps compute the same function
    batch = batch_of(10, 16, groups=groups, seed=1)

    def step(max_tokens):
        copied = copy.deepcopy(model)
        before = [p.detach().clone() for p in copied.parameters()]
        # plain SGD without clipping: the update is the gradient itself, so a part weighted wrongly shows
        optimizer = torch.optim.SGD(copied.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        loss = train_step(copied, batch, optimizer=optimizer, scheduler=scheduler,
                          scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=torch.autocast("cpu", enabled=False),
                          max_grad_norm=1e9, max_tokens=max_tokens)
        return loss.item(), [b - p.detach() for b, p in zip(before, copied.parameters())]

    whole_loss, whole_update = step(None)
    parts_loss, parts_update = step(40)  # 2 windows a part
    assert len(micro_batches(batch, 40)) > 3
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)
    assert sum(u.abs().sum() for u in whole_update) > 0
    for ours, theirs in zip(parts_update, whole_update):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_under_autocast_a_step_casts_each_weight_once_over_its_parts_and_the_next_step_casts_anew(
        tiny_model_and_tokenizer, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    import train_job.optim

    model, _ = tiny_model_and_tokenizer
    batch = batch_of(10, 16, seed=2)
    parts = len(micro_batches(batch, 40))

    class CountWeightCasts(TorchDispatchMode):
        def __init__(self, weights):
            super().__init__()
            self.pointers, self.casts = {w.data_ptr() for w in weights}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
                self.casts += 1
            return func(*args, **(kwargs or {}))

    def two_steps():
        copied = copy.deepcopy(model)
        optimizer = torch.optim.SGD(copied.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        linear_weights = [m.weight for m in copied.modules() if isinstance(m, torch.nn.Linear)]
        counter = CountWeightCasts(linear_weights)
        with counter:
            losses = [train_step(copied, batch, optimizer=optimizer, scheduler=scheduler,
                                 scaler=torch.amp.GradScaler("cpu", enabled=False),
                                 autocast=torch.autocast("cpu", dtype=torch.bfloat16), max_grad_norm=1e9,
                                 max_tokens=40).item() for _ in range(2)]
        return losses, [p.detach().clone() for p in copied.parameters()], counter.casts / len(linear_weights)

    losses, weights, casts_per_weight = two_steps()
    assert parts > 1 and casts_per_weight == 2  # once a step, not once a part
    monkeypatch.setattr(train_job.optim, "weights_cast_once", contextlib.nullcontext)  # a region per part
    per_part_losses, per_part_weights, per_part_casts = two_steps()
    assert per_part_casts == 2 * parts
    # the same numbers: and the second step read the weights the first one updated, not stale copies
    assert losses == per_part_losses and losses[0] != losses[1]
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(weights, per_part_weights))
