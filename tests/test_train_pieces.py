"""The pieces of a trustworthy run, without Ray: resource fit, fingerprints, epoch order, checkpoints, Hub push
(the training step's own: test_train_step.py)."""

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


def test_training_windows_travel_in_the_smallest_types_and_batch_as_before():
    from qa_common import trim_padding
    from train_job.data import compact_tokens

    features = {"input_ids": np.array([[101, 30521, 102, 0], [101, 7, 102, 5]], dtype=np.int32),
                "token_type_ids": np.array([[0, 0, 1, 0], [0, 0, 1, 1]], dtype=np.int32),
                "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.int32),
                "start_positions": np.array([1, 0]), "group": np.array([70000, 70001])}
    compact = compact_tokens(features)
    assert [compact[name].dtype for name in ("input_ids", "token_type_ids", "attention_mask")] == \
        [np.uint16, np.uint8, np.uint8]
    assert compact["start_positions"] is features["start_positions"] and compact["group"] is features["group"]

    def as_batch(columns: dict) -> dict:  # as train_job.loop makes a step's batch
        return {name: torch.as_tensor(values, dtype=torch.long) for name, values in trim_padding(columns).items()}

    for name in features:
        np.testing.assert_array_equal(compact[name], features[name])
    assert all(torch.equal(batch, as_batch(features)[name]) for name, batch in as_batch(compact).items())
    large_vocabulary = compact_tokens({"input_ids": np.array([[101, 119546]], dtype=np.int32)})
    assert large_vocabulary["input_ids"].dtype == np.uint32  # ids past 65,535 keep 4 bytes
