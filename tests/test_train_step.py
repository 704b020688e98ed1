"""The training step's own pieces, without Ray: attention dropout, cheap dropout and the training attention,
gradient checkpointing, the optimiser, and the allocator settings of a training worker."""

import json
import os

import pytest
import torch

from train_job.allocator import tcmalloc_library
from train_job.config import TrainConfig


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
        TrainConfig(model="m", attention_dropout=1.0).validate()


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
        return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    loss, plain = gradients(False)
    checkpointed_loss, checkpointed = gradients(True)
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6) and plain.keys() == checkpointed.keys()
    for name, gradient in plain.items():
        assert torch.allclose(checkpointed[name], gradient, atol=1e-5), name


def test_adamw_is_one_fused_kernel_on_a_cpu_and_updates_as_the_loop_over_parameters_does(tiny_model_dir):
    from transformers import AutoModelForQuestionAnswering

    from train_job.optim import build_optimizer

    updated = {}
    for fused in (None, False):
        torch.manual_seed(0)
        model = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir)
        optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.01, fused=fused)
        assert optimizer.defaults["fused"] is (fused is None)  # the default on a CPU: fused
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            for parameter in model.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        updated[fused] = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    assert torch.allclose(updated[None], updated[False], rtol=1e-5, atol=1e-6)


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


def test_allocator_choice_preloads_tcmalloc_into_the_workers_where_installed(monkeypatch):
    from train_job import allocator, config

    from ray._private.utils import update_envs  # what Ray applies to a worker's environment as it starts it

    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "libtcmalloc_minimal.so.4")
    env_vars = allocator.worker_runtime_env("auto")["env_vars"]
    # monkeypatch restores this process's LD_PRELOAD afterwards, whatever update_envs wrote into it
    monkeypatch.setenv("LD_PRELOAD", "")
    update_envs(env_vars)
    assert os.environ["LD_PRELOAD"].strip(":") == "libtcmalloc_minimal.so.4"
    monkeypatch.setenv("LD_PRELOAD", "libnode-own.so")  # what the node preloads already is kept
    update_envs(env_vars)
    assert os.environ["LD_PRELOAD"].split(":") == ["libtcmalloc_minimal.so.4", "libnode-own.so"]
    assert allocator.worker_runtime_env("tcmalloc") == allocator.worker_runtime_env("auto")
    assert allocator.worker_runtime_env("glibc") == {}
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert allocator.worker_runtime_env("auto") == {}
    monkeypatch.setattr(config, "tcmalloc_library", lambda: None)
    values = dict(train_file="train.json", holdout_questions=10)
    with pytest.raises(ValueError, match="apt-get install libtcmalloc-minimal4.*--allocator glibc"):
        config.TrainConfig(**values, allocator="tcmalloc").validate()
    with pytest.raises(ValueError, match="--allocator must be one of auto, tcmalloc, glibc"):
        config.TrainConfig(**values, allocator="jemalloc").validate()
    assert config.TrainConfig(**values).validate().allocator == "auto"


@pytest.mark.skipif(not tcmalloc_library(),
                    reason="needs tcmalloc (Debian: apt-get install libtcmalloc-minimal4)")
def test_a_worker_started_with_tcmalloc_preloaded_runs_on_it_and_leaves_glibc_alone():
    import os
    import subprocess
    import sys

    from train_job.allocator import worker_runtime_env

    program = "from train_job.allocator import set_up_allocator; print(set_up_allocator())"
    # the worker's LD_PRELOAD as Ray starts it: ${LD_PRELOAD} replaced by what this process preloads
    preload = worker_runtime_env("tcmalloc")["env_vars"]["LD_PRELOAD"]
    env = {**os.environ, "LD_PRELOAD": preload.replace("${LD_PRELOAD}", os.environ.get("LD_PRELOAD", ""))}
    preloaded = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    plain = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert (preloaded.stdout.strip(), plain.stdout.strip()) == ("tcmalloc", "glibc")
    assert preloaded.stderr == ""  # the loader found the library by its name
