"""Shared fixtures: a tiny BERT QA model and tokenizer built locally (no downloads), fixture data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def fixture_words() -> list[str]:
    """Every lowercase word and punctuation mark of the fixture data, as BERT's pre-tokenizer splits it."""
    text = (FIXTURES / "tiny-squad.jsonl").read_text(encoding="utf-8").lower()
    words = set()
    for line in text.splitlines():
        record = json.loads(line)
        words.update(re.findall(r"\w+|[^\w\s]", record["context"] + " " + record["question"]))
    return sorted(words)


def build_tiny_model(directory: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A randomly initialised 2-layer BERT QA model with a vocab of the fixture words, saved to ``directory``."""
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(SPECIAL_TOKENS + fixture_words()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=512,
    )
    BertForQuestionAnswering(config).save_pretrained(directory)
    return directory


V2_DATA = FIXTURES / "tiny-squad-v2.json"


@pytest.fixture(scope="session")
def abstaining_run(tmp_path_factory):
    """``(run directory, metrics)`` of a tiny model trained to abstain (train_job.run with
    --negative-ratio, one worker) on the fixture's answerable questions and validated on
    ``tiny-squad-v2.json`` (the same questions plus questions asked of another article's paragraph).
    Settings sized so that the tiny model learns the fixture in a few epochs; trained once per session."""
    import ray

    from train_job.config import TrainConfig
    from train_job.run import run

    directory = tmp_path_factory.mktemp("abstaining")
    model = build_tiny_model(directory / "tiny", hidden=64)
    config = TrainConfig(
        model=str(model), train_file=str(FIXTURES / "tiny-squad.jsonl"), validation_file=str(V2_DATA),
        output_dir=str(directory / "run"), num_workers=1, epochs=12, learning_rate=3e-3, warmup_ratio=0.0,
        per_device_batch_size=2, negative_ratio=3, max_failures=0, qa=abstaining_qa(),
    ).validate()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        metrics = run(config)
    finally:
        ray.shutdown()
    return directory / "run", metrics


def abstaining_qa():
    from qa_common import QAConfig

    return QAConfig(max_length=160, stride=32, max_question_length=24)  # one window per fixture question


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir):
    from qa_common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def fixture_records():
    from qa_common import read_squad

    return read_squad(FIXTURES / "tiny-squad.json")


@pytest.fixture
def small_config():
    """Short windows so the fixture contexts need several overlapping windows."""
    from qa_common import QAConfig

    return QAConfig(max_length=48, stride=16, max_question_length=20)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for one test module (4 logical CPUs: 2 training workers plus Ray Data)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (``CI=true``) a skipped test fails: CI installs everything a test needs (Chromium,
    the dev extras), so a skip there means a broken install, not a missing optional tool."""
    outcome = yield
    report = outcome.get_result()
    if _under_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing may be: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped while it is collected (``pytest.importorskip``): under CI it
    is a collection error, never a module that silently vanishes."""
    outcome = yield
    report = outcome.get_result()
    if _under_ci() and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI, where nothing may be: {reason}"
