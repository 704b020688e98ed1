"""--max-batch-tokens: a batch's gradients added up over parts of at most N tokens give the batch's update."""

import copy

import pytest
import torch

from train_job.loss import micro_batches
from train_job.optim import build_optimizer, sparse_lookup_gradients, train_step


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


def test_a_sparse_lookup_gradient_makes_the_dense_steps_update_over_parts(tiny_model_and_tokenizer):
    """On a CPU the word embedding's backward names only the rows read, added up over the parts, and
    is made dense once before clipping and fused AdamW (which takes no sparse gradient): the update is
    the dense path's, to float rounding."""
    model, _ = tiny_model_and_tokenizer
    batch = batch_of(10, 16, seed=2)

    def step(sparse: bool):
        copied = copy.deepcopy(model)
        if sparse:
            assert sparse_lookup_gradients(copied, torch.device("cpu"))
        lookup = copied.get_input_embeddings()
        seen = []
        lookup.weight.register_hook(lambda gradient: seen.append(gradient.is_sparse))
        optimizer = build_optimizer(copied, learning_rate=1e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        before = lookup.weight.detach().clone()
        train_step(copied, batch, optimizer=optimizer, scheduler=scheduler, scaler=torch.amp.GradScaler("cpu", enabled=False),
                   autocast=torch.autocast("cpu", enabled=False), max_tokens=40)
        return seen, lookup.weight.detach() - before, [p.detach() for p in copied.parameters()]

    dense_seen, dense_update, dense_after = step(False)
    sparse_seen, sparse_update, sparse_after = step(True)
    assert dense_seen == [False] * 5 and sparse_seen == [True] * 5  # one backward per part of two windows
    assert dense_update.abs().sum() > 0
    torch.testing.assert_close(sparse_update, dense_update, rtol=1e-4, atol=1e-7)
    for ours, theirs in zip(sparse_after, dense_after):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert not sparse_lookup_gradients(copy.deepcopy(model), torch.device("cuda"))  # a GPU's dense lookup is cheap
    assert not sparse_lookup_gradients(copy.deepcopy(model), torch.device("cpu"), compiled=True)  # inductor: no sparse backward
