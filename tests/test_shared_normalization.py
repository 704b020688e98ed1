"""Shared normalisation (train_job/loss.py): one softmax over all windows of a question, and batches
that hold whole questions (train_job/data.py)."""

import numpy as np
import pytest
import torch

from train_job.data import epoch_batches, epoch_shard, training_units
from train_job.loss import model_loss, shared_loss


def log_softmax_all(*rows: torch.Tensor) -> torch.Tensor:
    """The log-softmax over the concatenation of ``rows``: one question's windows, no padding."""
    return torch.log_softmax(torch.cat(rows), dim=0)


def test_windows_that_are_their_own_questions_get_berts_per_window_loss():
    logits = torch.randn(4, 7, dtype=torch.float64)
    positions = torch.tensor([3, 0, 5, 0])
    mask = torch.ones(4, 7, dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(logits, positions)
    assert shared_loss(logits, positions, torch.arange(4), mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_one_softmax_over_all_windows_of_a_question():
    logits = torch.randn(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    joint = log_softmax_all(*logits)  # window w, position p is joint[6 * w + p]

    # The answer in window 1 only: its probability among all 18 positions.
    answered = shared_loss(logits, torch.tensor([0, 4, 0]), torch.zeros(3), mask)
    assert answered.item() == pytest.approx(-joint[6 + 4].item(), rel=1e-5)

    # The answer in windows 0 and 2 (an overlap, or the same words in two passages): their summed probability.
    twice = shared_loss(logits, torch.tensor([2, 0, 5]), torch.zeros(3), mask)
    assert twice.item() == pytest.approx(-torch.logsumexp(joint[[2, 12 + 5]], 0).item(), rel=1e-5)

    # No window answers: every window's [CLS], weighted equally.
    none = shared_loss(logits, torch.tensor([0, 0, 0]), torch.zeros(3), mask)
    assert none.item() == pytest.approx(-joint[[0, 6, 12]].mean().item(), rel=1e-5)


def test_questions_in_one_batch_are_normalised_apart_and_averaged():
    logits = torch.randn(5, 4)
    mask = torch.ones(5, 4, dtype=torch.bool)
    positions, groups = torch.tensor([0, 2, 1, 0, 0]), torch.tensor([7, 7, 3, 3, 9])
    together = shared_loss(logits, positions, groups, mask)
    apart = [shared_loss(logits[rows], positions[rows], groups[rows], mask[rows]) for rows in ([0, 1], [2, 3], [4])]
    assert together.item() == pytest.approx(torch.stack(apart).mean().item(), rel=1e-6)


def test_padding_takes_no_probability_and_gradients_stay_finite():
    logits = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = shared_loss(logits, torch.tensor([0, 0]), torch.tensor([1, 1]), mask)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, 3:] == 0).all()
    bumped = logits.detach().clone()
    bumped[0, 3:] += 100.0
    assert shared_loss(bumped, torch.tensor([0, 0]), torch.tensor([1, 1]), mask).item() == pytest.approx(loss.item())


def test_the_model_loss_is_shared_only_when_the_batch_names_groups(tiny_model_and_tokenizer):
    model, _ = tiny_model_and_tokenizer
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 50, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long),
             "start_positions": torch.tensor([4, 0, 0]), "end_positions": torch.tensor([6, 0, 0])}
    model.eval()
    with torch.no_grad():
        per_window = model_loss(model, batch)
        assert per_window.item() == pytest.approx(model(**batch).loss.item())
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        shared = model_loss(model, {**batch, "group": torch.tensor([0, 0, 0])})
    mask = batch["attention_mask"].bool()
    expected = (shared_loss(outputs.start_logits, batch["start_positions"], torch.zeros(3), mask)
                + shared_loss(outputs.end_logits, batch["end_positions"], torch.zeros(3), mask)) / 2
    assert shared.item() == pytest.approx(expected.item()) and shared.item() != pytest.approx(per_window.item())


@pytest.mark.parametrize("num_workers", [1, 2])
def test_an_epoch_batches_whole_questions_and_every_window_once(num_workers):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, size=40)  # windows per question
    group = np.repeat(rng.permutation(1000)[:40], sizes)  # any ids, windows of a question adjacent...
    order = rng.permutation(len(group))  # ...or not: featurising may interleave them
    attention = (np.arange(64)[None, :] < rng.integers(8, 64, size=len(group))[:, None]).astype(np.int32)
    features = {"group": group[order], "attention_mask": attention[order]}
    units = training_units(features, batch_size=12)
    assert len(units) == 40 and units.per_batch == round(12 * 40 / len(group))
    for epoch in range(2):
        seen = []
        for rank in range(num_workers):
            shard = epoch_shard(len(units), num_workers, rank, epoch, seed=1)
            for batch in epoch_batches(shard, units.lengths, units.per_batch, np.random.default_rng(epoch), 4):
                rows = units.windows(batch)
                groups = set(features["group"][rows])
                assert len(groups) == len(batch)  # whole questions: every window of each group in this batch
                assert all((features["group"] == g).sum() == (features["group"][rows] == g).sum() for g in groups)
                seen += rows.tolist()
        assert sorted(seen) == list(range(len(group)))


def test_windows_without_groups_are_their_own_units():
    features = {"attention_mask": np.ones((10, 8), dtype=np.int32)}
    units = training_units(features, batch_size=4)
    assert len(units) == 10 and units.per_batch == 4 and units.rows is None
    np.testing.assert_array_equal(units.windows(np.array([3, 1])), [3, 1])
