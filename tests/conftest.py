"""Shared fixtures: a tiny BERT QA model and tokenizer built locally (no downloads), fixture data, and
one local Ray for the session.

Starting Ray costs seconds; so the modules that drive Ray from this process share one
(:func:`shared_ray`: 4 logical CPUs, metrics exported every second), and the services they deploy
share its one Serve (``serve_helpers.serving``: each module deploys its application and deletes it).
Modules that start Rays of their own (the bench scripts, the two-node cluster, a 2-CPU cluster)
take the ``isolated_from_ray`` fixture, which stops the shared one first: two local Rays on one
machine confuse Ray Train's placement-group cleaner. The next module that needs it starts it again.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# Ray Train's controller looks at its workers every 2 s: a tiny run of a few seconds would spend about
# as long again waiting for those looks (at start, after each report, at the end). The suite's runs,
# and the subprocesses it starts, look five times a second.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
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
    Settings sized so that the tiny model learns the fixture in a few epochs; trained once per session:
    under pytest-xdist the first worker to need it trains it into their common temporary folder while
    the other waits, and both read it from there."""
    from filelock import FileLock

    common = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        common = common.parent  # pytest-xdist gives each worker a folder under the session's one
    directory, done = common / "abstaining", common / "abstaining.json"
    shared_ray()
    with FileLock(str(common / "abstaining.lock")):
        if not done.exists():
            done.write_text(json.dumps(train_abstaining(directory)), encoding="utf-8")
    return directory / "run", json.loads(done.read_text(encoding="utf-8"))


def train_abstaining(directory: Path) -> dict:
    from train_job.config import TrainConfig
    from train_job.run import run

    model = build_tiny_model(directory / "tiny", hidden=64)
    config = TrainConfig(
        model=str(model), train_file=str(FIXTURES / "tiny-squad.jsonl"), validation_file=str(V2_DATA),
        output_dir=str(directory / "run"), num_workers=1, epochs=12, learning_rate=3e-3, warmup_ratio=0.0,
        per_device_batch_size=2, negative_ratio=3, max_failures=0, qa=abstaining_qa(),
    ).validate()
    # 18 validation questions: let the export fit its score map, so that what serves this model shows
    # that it applies the map.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("qa_common.calibration.paragraphs.MIN_SCORE_QUESTIONS", 5)
        return run(config)


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


# ``started``: this copy of the module started the running Ray. A pytester run of this conftest
# (test_ci_skips) imports a second copy in the same process, whose session end must leave it alone.
_SHARED_RAY = {"metrics_port": None, "started": False}


def shared_ray() -> None:
    """Start the session's local Ray unless this process is connected to one already."""
    import ray
    from ray import serve  # noqa: F401 -- imported here, never under a test's captured output: Serve's
    from ray._private import auto_init_hook  # logger keeps the sys.stderr of its first import

    from serve_app.request_ids import set_proxy_environment

    if ray.is_initialized():
        return
    # A Serve handle's background task that outlives its Ray would start a new one by itself (Ray's
    # auto-init) beside the next module's: no Ray starts but the ones the tests start.
    auto_init_hook.enable_auto_connect = False
    set_proxy_environment()  # its Serve proxies take client request ids out, as a deployed service's do
    # Ray's exporter binds a port of its own choosing: a port probed free here could be taken by the
    # other test worker's Ray, starting at the same moment, before this one binds it.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    [node] = ray.nodes()
    _SHARED_RAY.update(metrics_port=node["MetricsExportPort"], started=True)


def ray_metrics_port() -> int:
    """Where the shared Ray exports its Prometheus metrics (start it first)."""
    return _SHARED_RAY["metrics_port"]


def stop_shared_ray() -> None:
    # Never the first import of Ray: a pytester run of this conftest would import it inside the run,
    # and pytester drops the modules a run imported while Ray's native core stays loaded: the next
    # import of Ray in the process then crashes it.
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray import serve

    serve.shutdown()  # its proxies, replicas and this process's handles
    ray.shutdown()
    _SHARED_RAY["started"] = False


@pytest.fixture(scope="module")
def local_ray():
    """The session's local Ray (4 logical CPUs: 2 training workers plus Ray Data), for one test module."""
    shared_ray()
    yield


@pytest.fixture(scope="module")
def isolated_from_ray():
    """For modules that start Rays of their own: no Ray of this process runs beside them."""
    stop_shared_ray()
    yield


def pytest_collection_modifyitems(session, config, items):
    """The modules that start Rays of their own run first, so that the shared Ray starts once after them."""
    items.sort(key=lambda item: "isolated_from_ray" not in item.fixturenames)


def pytest_sessionfinish(session, exitstatus):
    if _SHARED_RAY["started"]:
        stop_shared_ray()


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
