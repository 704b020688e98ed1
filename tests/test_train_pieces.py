"""The pieces of a trustworthy run, without Ray: resource fit, fingerprints, epoch order, checkpoints, Hub push."""

import json
import pickle

import numpy as np
import pytest
import torch

from conftest import FIXTURES
from qa_common import QAConfig
from train_job import checkpoint
from train_job.config import TrainConfig, TrainJobError
from train_job.data import epoch_batches, epoch_shard
from train_job.fingerprint import changes, claim_run_dir, run_fingerprint
from train_job.resources import Capacity, ResourceError, check_fits, resolve_cpus_per_worker


def config(**overrides) -> TrainConfig:
    values = dict(model="m", train_file=str(FIXTURES / "tiny-squad.jsonl"), validation_file=str(FIXTURES / "tiny-squad.json"),
                  qa=QAConfig(max_length=48, stride=16, max_question_length=20))
    return TrainConfig(**{**values, **overrides}).validate()


# --- resources ---------------------------------------------------------------------------------


def test_a_trial_that_cannot_fit_says_what_would():
    with pytest.raises(ResourceError, match=r"each trial needs 2.1 CPUs .*; this cluster has 2: use --cpus-per-worker 1.9"):
        check_fits(config(cpus_per_worker=2), Capacity(cpus=2, gpus=0, largest_node_cpus=2), driver_cpus=0.1)
    with pytest.raises(ResourceError, match=r"the run needs 4 CPUs .*this cluster has 2: use --cpus-per-worker 1$"):
        check_fits(config(num_workers=2, cpus_per_worker=2), Capacity(cpus=2, gpus=0, largest_node_cpus=2))
    with pytest.raises(ResourceError, match=r"at most 4 on one node: use --cpus-per-worker 3.9"):
        check_fits(config(cpus_per_worker=6), Capacity(cpus=8, gpus=0, largest_node_cpus=4), driver_cpus=0.1)
    with pytest.raises(ResourceError, match="this cluster can scale to none: drop --use-gpu"):
        check_fits(config(use_gpu=True), Capacity(cpus=8, gpus=0, largest_node_cpus=8, autoscaling=True))
    with pytest.raises(ResourceError, match="2 GPU.*has 1: use --num-workers 1"):
        check_fits(config(use_gpu=True, num_workers=2), Capacity(cpus=8, gpus=1, largest_node_cpus=8))
    check_fits(config(cpus_per_worker=1.9), Capacity(cpus=2, gpus=0, largest_node_cpus=2), driver_cpus=0.1)


def test_auto_cpus_fit_the_machine_and_leave_the_trial_driver_its_share():
    two_cores = Capacity(cpus=2, gpus=0, largest_node_cpus=2)
    quickstart = config(cpus_per_worker=None)
    assert resolve_cpus_per_worker(quickstart, two_cores).cpus_per_worker == 2
    tuned = resolve_cpus_per_worker(quickstart, two_cores, driver_cpus=0.1)
    assert tuned.cpus_per_worker == 1.9
    check_fits(tuned, two_cores, driver_cpus=0.1)
    assert resolve_cpus_per_worker(quickstart, Capacity(cpus=16, gpus=0, largest_node_cpus=16)).cpus_per_worker == 2
    assert resolve_cpus_per_worker(config(cpus_per_worker=None, num_workers=2), two_cores).cpus_per_worker == 1
    assert resolve_cpus_per_worker(config(cpus_per_worker=3), two_cores).cpus_per_worker == 3  # given: kept


# --- fingerprints and the run directory ---------------------------------------------------------


def records(n=3):
    return [{"id": f"q{i}"} for i in range(n)]


def test_fingerprint_names_what_changed_and_holds_no_text():
    base = run_fingerprint(config(), records(), records())
    assert run_fingerprint(config(), records(), records()) == base
    assert changes(base, run_fingerprint(config(learning_rate=7e-5), records(), records())) == [
        "settings.learning_rate: 0.0001 -> 7e-05"]
    fewer = changes(base, run_fingerprint(config(), records(2), records()))
    assert len(fewer) == 2 and fewer[1] == "data.train.questions: 3 -> 2"
    # Where the output goes, how many CPUs and how it is logged do not change the model.
    assert run_fingerprint(config(output_dir="elsewhere", cpus_per_worker=3, report_to="tensorboard"),
                           records(), records()) == base
    assert base["data"]["train"]["file"] == "tiny-squad.jsonl" and "context" not in json.dumps(base)


def test_a_run_directory_holds_one_run(tmp_path, capsys):
    run_dir = str(tmp_path / "checkpoints" / "train")
    fingerprint = run_fingerprint(config(), records(), records())
    with pytest.raises(TrainJobError, match="no run to resume"):
        claim_run_dir(run_dir, fingerprint, config(resume=True))
    assert claim_run_dir(run_dir, fingerprint, config()) is False  # a new run
    assert claim_run_dir(run_dir, fingerprint, config()) is True  # the same settings: resume
    assert claim_run_dir(run_dir, fingerprint, config(resume=True)) is True
    other = run_fingerprint(config(learning_rate=7e-5), records(), records())
    with pytest.raises(TrainJobError, match=r"other settings or data \(settings.learning_rate: 0.0001 -> 7e-05\).*--overwrite"):
        claim_run_dir(run_dir, other, config(learning_rate=7e-5))

    (tmp_path / "checkpoints" / "train" / "checkpoint_1").mkdir()
    exported = tmp_path / "metrics.json"
    exported.write_text("{}")
    assert claim_run_dir(run_dir, other, config(learning_rate=7e-5, overwrite=True), exported=[exported]) is False
    assert not (tmp_path / "checkpoints" / "train" / "checkpoint_1").exists() and not exported.exists()
    assert claim_run_dir(run_dir, other, config(learning_rate=7e-5)) is True  # the new run is there now


# --- the order of the training windows ------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [1, 3])
def test_every_epoch_is_a_new_uniform_split_of_all_windows(num_workers):
    count, batch_size = 103, 4
    lengths = np.random.default_rng(0).integers(10, 48, size=count)
    orders = {}
    for epoch in (0, 1):
        shards = [epoch_shard(count, num_workers, rank, epoch, seed=42) for rank in range(num_workers)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(count))  # none dropped, none doubled
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        for rank, shard in enumerate(shards):
            for group in (1, 8):
                batches = epoch_batches(shard, lengths, batch_size, np.random.default_rng([42, epoch, rank]), group)
                assert sorted(np.concatenate(batches).tolist()) == sorted(shard.tolist())
                assert len(batches) == -(-len(shard) // batch_size)  # as many steps as steps_per_epoch counts
            orders[epoch, rank] = shard
    for rank in range(num_workers):
        assert orders[0, rank].tolist() != orders[1, rank].tolist()  # a new order (and sample) every epoch
    if num_workers > 1:
        assert set(orders[0, 0].tolist()) != set(orders[1, 0].tolist())
    np.testing.assert_array_equal(epoch_shard(count, num_workers, 0, 1, seed=42), orders[1, 0])  # reproducible


def test_length_grouping_batches_similar_lengths_within_the_shuffled_order():
    lengths = np.arange(64)
    shard = np.random.default_rng(1).permutation(64)
    batches = epoch_batches(shard, lengths, 8, np.random.default_rng(2), group_batches=8)
    assert all(np.ptp(lengths[b]) == 7 for b in batches)  # one group of 64: sorted, then cut


def test_attention_dropout_changes_the_attention_layers_only_and_not_the_saved_config(tiny_model_dir):
    from transformers import AutoModelForQuestionAnswering

    from train_job.optim import set_attention_dropout

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir)
    dropouts = lambda: {name: module.p for name, module in model.named_modules() if isinstance(module, torch.nn.Dropout)}
    before = dropouts()
    assert set_attention_dropout(model, None) == 0 and dropouts() == before
    assert set_attention_dropout(model, 0.0) == model.config.num_hidden_layers
    after = dropouts()
    changed = {name for name in before if after[name] != before[name]}
    assert changed and all(name.endswith("attention.self.dropout") for name in changed)
    assert {after[name] for name in changed} == {0.0} and model.config.attention_probs_dropout_prob == 0.1
    with pytest.raises(ValueError, match="--attention-dropout must be in"):
        config(attention_dropout=1.0)


def test_cheap_dropout_keeps_the_share_and_the_expectation_and_draws_from_the_seeded_generator():
    from train_job.dropout import cheap_dropout, keep_mask

    torch.manual_seed(3)
    keep, scale = keep_mask(torch.Size([1000, 1001]), 0.1)  # an odd count: the last 64-bit draw is cut
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - 3277 / 2**15)) < 0.002  # 0.1 rounded to 3277 / 2**15
    assert scale == 2**15 / (2**15 - 3277)
    rows = keep.float().mean(dim=1)  # no lane or stretch of the draws is biased
    assert rows.min() > 0.85 and rows.max() < 0.95
    assert all(abs(keep.flatten()[lane::4].float().mean().item() - 0.9) < 0.003 for lane in range(4))
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size([1000, 1001]), 0.1)[0], keep)  # seeded, so a resumed run redraws it
    assert not torch.equal(keep_mask(torch.Size([1000, 1001]), 0.1)[0], keep)

    x = torch.rand(400, 500, requires_grad=True)
    y = cheap_dropout(x, 0.25)
    assert abs(y.sum().item() / x.sum().item() - 1) < 0.01  # the kept values are scaled up to the same total
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * 2**15 / (2**15 - 8192))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 4 / 3))
    assert cheap_dropout(x, 0.25, training=False) is x and cheap_dropout(x, 0.0) is x


def test_the_training_attention_computes_and_differentiates_what_autograd_would_with_the_same_masks():
    from train_job.dropout import attention, keep_mask

    torch.manual_seed(5)
    query, key, value = (torch.randn(2, 3, 7, 4, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 1, 7, 7)
    mask[1, ..., 5:] = torch.finfo(torch.float32).min  # the second sequence's padding
    torch.manual_seed(9)
    output, _ = attention(None, query, key, value, mask, scaling=0.5, dropout=0.3)
    weights = torch.randn_like(output)
    grads = torch.autograd.grad((output * weights).sum(), (query, key, value))

    torch.manual_seed(9)  # autograd through the plain operations, with the masks the same draw gives
    probabilities = torch.softmax(query @ key.transpose(2, 3) * 0.5 + mask, dim=-1)
    keep, scale = keep_mask(probabilities.shape, 0.3)
    expected = (torch.where(keep, probabilities * scale, 0) @ value).transpose(1, 2)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    assert torch.allclose(output, expected, atol=1e-6)
    assert all(torch.allclose(got, want, atol=1e-5) for got, want in zip(grads, expected_grads))
    assert not keep.all() and grads[0].abs().sum() > 0


def test_a_model_with_cheap_dropout_evaluates_and_saves_as_before_and_masks_padding_in_training(tiny_model_dir, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    from train_job.dropout import CheapDropout, use_cheap_dropout
    from train_job.optim import set_attention_dropout

    torch.manual_seed(0)
    inputs = {"input_ids": torch.randint(5, 40, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    inputs["attention_mask"][1, 7:] = 0  # padding, which the training attention must mask as the model does
    reference = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir)
    layers = model.config.num_hidden_layers
    assert use_cheap_dropout(model) == 1 + 3 * layers  # embeddings; each layer's attention, its output, its MLP's
    assert not any(type(module) is torch.nn.Dropout for module in model.modules())
    assert set_attention_dropout(model, 0.2) == layers and all(
        isinstance(module, CheapDropout) for module in model.modules() if isinstance(module, torch.nn.Dropout))
    with torch.no_grad():
        expected = reference(**inputs)
        evaluated = model.eval()(**inputs)
        assert torch.allclose(evaluated.start_logits, expected.start_logits, atol=1e-5)
        for module in model.modules():  # the training path with nothing dropped: the same logits
            if isinstance(module, torch.nn.Dropout):
                module.p = 1e-9  # rounds to no element dropped, yet takes the path a training step takes
        trained = model.train()(**inputs)
        assert torch.allclose(trained.start_logits, expected.start_logits, atol=1e-5)
        assert torch.allclose(trained.end_logits, expected.end_logits, atol=1e-5)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.5
        assert not torch.allclose(model(**inputs).start_logits, expected.start_logits, atol=1e-3)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "attn" not in json.dumps(saved) and saved["attention_probs_dropout_prob"] == 0.1
    reloaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == reference.config._attn_implementation


def test_gradient_checkpointing_replays_the_cheap_dropout_masks_and_gives_the_same_gradients(tiny_model_dir):
    """What --gradient-checkpointing promises: the backward recomputes each layer with the masks its
    forward drew, so the step is the one it would have been (a recompute that drew new masks fails)."""
    from transformers import AutoModelForQuestionAnswering

    from train_job.dropout import use_cheap_dropout
    from train_job.optim import checkpoint_layers

    inputs = {"input_ids": torch.randint(5, 40, (4, 16), generator=torch.Generator().manual_seed(1)),
              "attention_mask": torch.ones(4, 16, dtype=torch.long),
              "start_positions": torch.tensor([1, 3, 5, 0]), "end_positions": torch.tensor([2, 3, 9, 0])}

    def gradients(checkpointing: bool) -> tuple[float, dict]:
        model = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir)
        use_cheap_dropout(model)
        if checkpointing:
            checkpoint_layers(model)
        model.train()
        torch.manual_seed(7)
        loss = model(**inputs).loss
        loss.backward()
        return float(loss), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    loss, plain = gradients(False)
    checkpointed_loss, checkpointed = gradients(True)
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6) and plain.keys() == checkpointed.keys()
    for name, gradient in plain.items():
        assert torch.allclose(checkpointed[name], gradient, atol=1e-5), name


def test_a_training_worker_keeps_freed_memory_for_its_next_step():
    import subprocess
    import sys

    # In a child process: the thresholds are the whole process's.
    program = """
import resource, sys, torch
from train_job.allocator import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a step's 48 MB activation, allocated, written and freed
        torch.empty(12 * 2**20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
assert keep_freed_memory()
faults()
print(default, faults())
"""
    default, kept = map(int, subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert default > 20 * 12 * 2**20 / 4096 * 0.9  # every page faulted in again, each time
    # Kept: the pages are reused. A margin of a few fault-ins: a loaded machine (CI) once faulted
    # one of ten allocations in again, which a bound of exactly a tenth did not allow.
    assert kept < default / 4


def test_the_featurising_tokenizer_is_loaded_once_per_process_and_again_when_its_files_change(tiny_model_dir, tmp_path):
    import shutil

    from train_job.data import featurizing_tokenizer, tokenizer_stamp

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    first = featurizing_tokenizer(str(model), tokenizer_stamp(str(model)))
    assert featurizing_tokenizer(str(model), tokenizer_stamp(str(model))) is first
    first.add_tokens(["newword"])  # a retrained model's tokenizer saved over the old one
    first.save_pretrained(model)
    reloaded = featurizing_tokenizer(str(model), tokenizer_stamp(str(model)))
    assert reloaded is not first and "newword" in reloaded.get_vocab()


# --- checkpoints ------------------------------------------------------------------------------


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    # Written as a GPU worker writes it: every storage tagged "cuda:0", which torch.load without
    # map_location refuses on a machine without CUDA.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"optimizer": optimizer.state_dict(), "step": 1}, tmp_path / checkpoint.TRAINING_STATE)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / checkpoint.TRAINING_STATE, weights_only=True)
    state = checkpoint.read_training_state(tmp_path)
    assert state["step"] == 1 and state["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    resumed = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    resumed.load_state_dict(state["optimizer"])
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickled_object_in_the_training_state_is_refused(tmp_path):
    torch.save({"step": 1, "payload": Payload()}, tmp_path / checkpoint.TRAINING_STATE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.read_training_state(tmp_path)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng": [checkpoint.rng_states()]}, tmp_path / checkpoint.TRAINING_STATE)
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.restore_rng_states(checkpoint.read_training_state(tmp_path)["rng"][0])
    drawn = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


# --- pushing to the Hub ---------------------------------------------------------------------------


class FakeHub:
    def __init__(self, *, existing_public=False):
        self.created, self.uploaded, self.existing_public = [], [], existing_public

    def __call__(self):
        return self

    def create_repo(self, repo, *, private, exist_ok):
        self.created.append((repo, private))

    def repo_info(self, repo):
        return type("Info", (), {"private": not self.existing_public and self.created[-1][1]})()

    def upload_folder(self, *, folder_path, repo_id):
        self.uploaded.append(repo_id)


@pytest.mark.parametrize("public", [False, True])
def test_push_to_hub_is_private_unless_asked_and_warns_about_memorisation(tmp_path, monkeypatch, capsys, public):
    import huggingface_hub

    from train_job.publish import push_to_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    push_to_hub(tmp_path, "me/model", public=public)
    assert hub.created == [("me/model", not public)] and hub.uploaded == ["me/model"]
    assert "memorise" in capsys.readouterr().err


def test_push_to_hub_does_not_upload_to_an_existing_public_repository(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from train_job.publish import push_to_hub

    hub = FakeHub(existing_public=True)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    push_to_hub(tmp_path, "me/model")
    assert hub.uploaded == [] and "is public" in capsys.readouterr().err


# --- the model card of an abstaining model -----------------------------------------------------------


@pytest.mark.parametrize("threshold, warned", [(0.0, True), (0.8125, False)])
def test_a_model_that_declines_every_validation_question_says_so_on_its_card(threshold, warned):
    from train_job.publish import DECLINES_EVERYTHING, declines_everything, model_card

    abstaining = config(negative_ratio=1, qa=QAConfig(max_length=48, stride=16, max_question_length=20,
                                                     version_2_with_negative=True))
    declined_all = threshold == 0.0
    metrics = {"eval_examples": 10, "total": 10, "exact": 40.0, "f1": 40.0 if declined_all else 55.0,
               "HasAns_total": 6, "HasAns_exact": 0.0 if declined_all else 50.0, "HasAns_f1": 0.0 if declined_all else 60.0,
               "NoAns_total": 4, "NoAns_exact": 100.0, "NoAns_f1": 100.0, "no_answer_threshold": threshold,
               "best_epoch": 2, "train_examples": 12, "train_features": 14, "train_samples_per_second": 3.0,
               "train_runtime_s": 8.0, "training_precision": "fp32", "training_dropout": "torch",
               "calibration": {"questions": 300, "score_knots": 12, "score_ece_before": 0.2, "score_ece_after": 0.1}}
    card = model_card(metrics, abstaining)
    assert "Calibration, fitted on the same validation questions" in card and "isotonic map of 12 knots" in card
    assert declines_everything(metrics, abstaining) is warned
    assert (DECLINES_EVERYTHING in card) is warned
    assert f"{threshold:.4f}" in card
    assert not declines_everything({**metrics, "no_answer_threshold": 0.0}, config()), "a v1 model never abstains"
